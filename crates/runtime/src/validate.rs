//! Checks on everything that crosses the boundary: the host's input (before
//! a call) and the plugin's output (after it). Output that breaks a rule is
//! rejected whole: a call yields all of its output or none.

use std::collections::HashSet;

use super::error::{Limit, OutputViolation, RuntimeError, Sealed};
use cloister_types::types::{
    Action, DataRecord, Decision, Metadata, PredictionSet, SparseBatch, Vocabulary,
};

fn bad(field: &'static str, problem: &'static str) -> RuntimeError {
    RuntimeError::BadMetadata { field, problem }
}

/// No control, bidirectional or invisible format character: what a
/// reviewer reads is what the plugin says (see [`cloister_types::text`]).
fn printable(s: &str) -> bool {
    !s.chars().any(cloister_types::text::is_deceptive)
}

fn identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

fn semver(s: &str) -> bool {
    let core = s.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    s.len() <= 64
        && parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-+.".contains(&b))
}

/// Plugin metadata is shown to reviewers: keep it short, printable and
/// well-formed.
pub(crate) fn metadata(m: &Metadata) -> Result<(), RuntimeError> {
    if !identifier(&m.name, 64) {
        return Err(bad(
            "name",
            "must be 1-64 characters of a-z, 0-9, '-', '_', '.'",
        ));
    }
    if !semver(&m.version) {
        return Err(bad("version", "must be a semantic version such as 1.2.3"));
    }
    if m.description.chars().count() > 1000 || !printable(&m.description) {
        return Err(bad(
            "description",
            "must be at most 1000 printable characters (no control, bidirectional or invisible format characters)",
        ));
    }
    if m.config.len() > 64 {
        return Err(bad("config", "declares more than 64 keys"));
    }
    let mut seen = HashSet::new();
    for k in &m.config {
        if !identifier(&k.name, 64) {
            return Err(bad(
                "config.name",
                "must be 1-64 characters of a-z, 0-9, '-', '_', '.'",
            ));
        }
        if !seen.insert(k.name.as_str()) {
            return Err(bad("config.name", "declares a key twice"));
        }
        if k.default_value.len() > 65536 || !printable(&k.default_value) {
            return Err(bad(
                "config.default-value",
                "must be at most 64 KiB of printable text (no control, bidirectional or invisible format characters)",
            ));
        }
        if k.description.chars().count() > 1000 || !printable(&k.description) {
            return Err(bad(
                "config.description",
                "must be at most 1000 printable characters (no control, bidirectional or invisible format characters)",
            ));
        }
    }
    Ok(())
}

/// Record ids in a batch must be unique.
pub(crate) fn unique_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Result<(), RuntimeError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(RuntimeError::InvalidInput(
                "a record id appears twice in one batch".into(),
            ));
        }
    }
    Ok(())
}

fn output_cap(bytes: usize, limit: usize) -> Result<(), RuntimeError> {
    if bytes > limit {
        Err(RuntimeError::LimitExceeded(Limit::Output { limit }))
    } else {
        Ok(())
    }
}

fn record_bytes(r: &DataRecord) -> usize {
    r.id.len()
        + r.label.as_ref().map_or(0, String::len)
        + r.texts
            .iter()
            .map(|t| t.name.len() + t.value.len())
            .sum::<usize>()
        + r.numerics
            .iter()
            .map(|n| n.name.len() + 8 * n.value.as_slice().len())
            .sum::<usize>()
}

/// A preprocessor's output: a subsequence of the input ids, no labels,
/// finite numbers, within the output cap.
pub(crate) fn preprocessed(
    input: &[DataRecord],
    out: &[DataRecord],
    cap: usize,
) -> Result<(), RuntimeError> {
    output_cap(out.iter().map(record_bytes).sum(), cap)?;
    let mut next = 0usize;
    for (position, r) in out.iter().enumerate() {
        match input[next..].iter().position(|i| i.id == r.id) {
            Some(offset) => next += offset + 1,
            None => {
                return Err(RuntimeError::InvalidOutput(Sealed::new(
                    OutputViolation::UnknownId { position },
                )));
            }
        }
        if r.label.is_some() {
            return Err(RuntimeError::InvalidOutput(Sealed::new(
                OutputViolation::LabelSet { position },
            )));
        }
        if r.numerics
            .iter()
            .any(|n| n.value.as_slice().iter().any(|v| !v.is_finite()))
        {
            return Err(RuntimeError::InvalidOutput(Sealed::new(
                OutputViolation::NonFinite { row: position },
            )));
        }
    }
    Ok(())
}

/// A fitted featurizer's term keys for one record: only their size is
/// bounded (any key is a valid term; the host counts them).
pub(crate) fn terms(keys: &[u64], cap: usize) -> Result<(), RuntimeError> {
    output_cap(8 * keys.len(), cap)
}

/// A vocabulary handed to a fitted featurizer: keys strictly increasing,
/// one count per key, each count between 1 and the documents counted.
pub(crate) fn vocabulary(v: &Vocabulary) -> Result<(), RuntimeError> {
    let bad = |what: &str| Err(RuntimeError::InvalidInput(format!("vocabulary: {what}")));
    if v.keys.len() != v.document_frequencies.len() {
        return bad("one document frequency per key is needed");
    }
    if v.keys.windows(2).any(|w| w[0] >= w[1]) {
        return bad("keys must be strictly increasing");
    }
    if v.document_frequencies
        .iter()
        .any(|&df| df == 0 || df > v.documents)
    {
        return bad("a document frequency is 0 or above the documents counted");
    }
    Ok(())
}

/// A featurizer's output: one well-formed sparse row per input record.
pub(crate) fn features(
    rows: usize,
    dimension: u32,
    b: &SparseBatch,
    cap: usize,
) -> Result<(), RuntimeError> {
    output_cap(
        4 * (b.offsets.len() + b.indices.len() + b.values.len()),
        cap,
    )?;
    let violation = |v| Err(RuntimeError::InvalidOutput(Sealed::new(v)));
    if b.offsets.len() != rows + 1 {
        return violation(OutputViolation::WrongCount {
            expected: rows,
            got: b.offsets.len().saturating_sub(1),
        });
    }
    if b.offsets[0] != 0
        || b.offsets.windows(2).any(|w| w[0] > w[1])
        || b.offsets[rows] as usize != b.indices.len()
        || b.indices.len() != b.values.len()
    {
        return violation(OutputViolation::BadOffsets);
    }
    for row in 0..rows {
        let (a, z) = (b.offsets[row] as usize, b.offsets[row + 1] as usize);
        let idx = &b.indices[a..z];
        if let Some(&index) = idx.iter().find(|&&i| i >= dimension) {
            return violation(OutputViolation::IndexOutOfRange {
                row,
                index,
                dimension,
            });
        }
        if idx.windows(2).any(|w| w[0] >= w[1]) {
            return violation(OutputViolation::UnsortedIndices { row });
        }
        if b.values[a..z].iter().any(|v| !v.is_finite()) {
            return violation(OutputViolation::NonFinite { row });
        }
    }
    Ok(())
}

/// A selector's input: named distinct classes, and per item one or more
/// finite distributions over them.
pub(crate) fn prediction_sets(
    classes: &[String],
    batch: &[PredictionSet],
) -> Result<(), RuntimeError> {
    if classes.is_empty() {
        return Err(RuntimeError::InvalidInput("no classes given".into()));
    }
    let distinct: HashSet<&String> = classes.iter().collect();
    if distinct.len() != classes.len() {
        return Err(RuntimeError::InvalidInput(
            "class names are not distinct".into(),
        ));
    }
    unique_ids(batch.iter().map(|p| p.id.as_str()))?;
    for p in batch {
        if p.models.is_empty() {
            return Err(RuntimeError::InvalidInput(
                "an item has no model predictions".into(),
            ));
        }
        for dist in &p.models {
            if dist.len() != classes.len() || dist.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(RuntimeError::InvalidInput(format!(
                    "a prediction is not a distribution over the {} classes",
                    classes.len()
                )));
            }
        }
    }
    Ok(())
}

/// A selector's output: one decision per item, same ids in order, valid
/// class indices, finite priorities.
pub(crate) fn decisions(
    batch: &[PredictionSet],
    classes: usize,
    out: &[Decision],
    cap: usize,
) -> Result<(), RuntimeError> {
    output_cap(out.iter().map(|d| d.id.len() + 12).sum(), cap)?;
    if out.len() != batch.len() {
        return Err(RuntimeError::InvalidOutput(Sealed::new(
            OutputViolation::WrongCount {
                expected: batch.len(),
                got: out.len(),
            },
        )));
    }
    for (position, (d, p)) in out.iter().zip(batch).enumerate() {
        if d.id != p.id {
            return Err(RuntimeError::InvalidOutput(Sealed::new(
                OutputViolation::IdMismatch { position },
            )));
        }
        if let Action::AutoAccept(class) = d.action
            && class as usize >= classes
        {
            return Err(RuntimeError::InvalidOutput(Sealed::new(
                OutputViolation::ClassOutOfRange {
                    position,
                    class,
                    classes,
                },
            )));
        }
        if !d.priority.is_finite() {
            return Err(RuntimeError::InvalidOutput(Sealed::new(
                OutputViolation::NonFinite { row: position },
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(offsets: Vec<u32>, indices: Vec<u32>, values: Vec<f32>) -> SparseBatch {
        SparseBatch {
            offsets,
            indices,
            values,
        }
    }

    fn code(r: Result<(), RuntimeError>) -> &'static str {
        r.err().map_or("ok", |e| e.code())
    }

    #[test]
    fn feature_rules() {
        assert_eq!(
            code(features(
                2,
                8,
                &batch(vec![0, 1, 2], vec![3, 4], vec![1.0, 2.0]),
                1 << 20
            )),
            "ok"
        );
        assert_eq!(
            code(features(
                3,
                8,
                &batch(vec![0, 1, 2], vec![3, 4], vec![1.0, 2.0]),
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(features(
                1,
                8,
                &batch(vec![0, 2], vec![4, 3], vec![1.0, 2.0]),
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(features(
                1,
                4,
                &batch(vec![0, 1], vec![4], vec![1.0]),
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(features(
                1,
                8,
                &batch(vec![0, 1], vec![4], vec![f32::NAN]),
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(features(
                1,
                8,
                &batch(vec![0, 3], vec![4], vec![1.0]),
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(features(1, 8, &batch(vec![0, 1], vec![4], vec![1.0]), 4)),
            "limit-output"
        );
    }

    fn rec(id: &str, label: Option<&str>) -> DataRecord {
        DataRecord {
            id: id.into(),
            texts: vec![],
            numerics: vec![],
            label: label.map(Into::into),
        }
    }

    #[test]
    fn preprocess_rules() {
        let input = vec![rec("a", None), rec("b", None), rec("c", None)];
        assert_eq!(
            code(preprocessed(
                &input,
                &[rec("a", None), rec("c", None)],
                1 << 20
            )),
            "ok"
        );
        assert_eq!(
            code(preprocessed(
                &input,
                &[rec("c", None), rec("a", None)],
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(preprocessed(&input, &[rec("z", None)], 1 << 20)),
            "invalid-output"
        );
        assert_eq!(
            code(preprocessed(
                &input,
                &[rec("a", None), rec("a", None)],
                1 << 20
            )),
            "invalid-output"
        );
        assert_eq!(
            code(preprocessed(&input, &[rec("a", Some("spam"))], 1 << 20)),
            "invalid-output"
        );
    }

    /// The plugin SDK's native harness (`cloister_plugin_sdk::testing`)
    /// restates these rules for plugin authors' unit tests, which cannot
    /// run this crate. Every case here goes through both: the same verdict,
    /// and for a violation the same words.
    mod sdk_agrees {
        use super::super::*;
        use cloister_plugin_sdk as sdk;
        use cloister_plugin_sdk::testing;
        use cloister_types::types::{NumericField, TextField};

        fn host_words(r: Result<(), RuntimeError>) -> Option<String> {
            match r {
                Ok(()) => None,
                Err(RuntimeError::InvalidOutput(v)) => Some(v.for_admin_log().to_string()),
                Err(e) => panic!("not an output violation: {e}"),
            }
        }

        fn sdk_words(r: Result<(), testing::Violation>) -> Option<String> {
            r.err().map(|v| v.to_string())
        }

        #[test]
        fn on_features() {
            // (rows, dimension, offsets, indices, values)
            type Case = (usize, u32, Vec<u32>, Vec<u32>, Vec<f32>);
            let cases: [Case; 8] = [
                (2, 8, vec![0, 1, 2], vec![3, 4], vec![1.0, 2.0]),
                (3, 8, vec![0, 1, 2], vec![3, 4], vec![1.0, 2.0]),
                (1, 8, vec![0, 1], vec![8], vec![1.0]),
                (1, 8, vec![0, 2], vec![4, 4], vec![1.0, 1.0]),
                (1, 8, vec![0, 2], vec![5, 4], vec![1.0, 1.0]),
                (1, 8, vec![0, 1], vec![1], vec![f32::INFINITY]),
                (2, 8, vec![0, 2, 1], vec![1, 2], vec![1.0, 1.0]),
                (1, 8, vec![1, 1], vec![], vec![]),
            ];
            let mut refused = 0;
            for (rows, dim, offsets, indices, values) in cases {
                let host = SparseBatch {
                    offsets: offsets.clone(),
                    indices: indices.clone(),
                    values: values.clone(),
                };
                let theirs = sdk::SparseBatch {
                    offsets,
                    indices,
                    values,
                };
                let words = host_words(features(rows, dim, &host, 1 << 20));
                refused += usize::from(words.is_some());
                assert_eq!(
                    words,
                    sdk_words(testing::check_features(rows, dim, &theirs)),
                    "{host:?}"
                );
            }
            assert_eq!(refused, 7, "every case but the first breaks a rule");
        }

        fn both(id: &str, label: Option<&str>, number: f64) -> (DataRecord, sdk::DataRecord) {
            let host = DataRecord {
                id: id.into(),
                texts: vec![TextField {
                    name: "t".into(),
                    value: "x".into(),
                }],
                numerics: vec![NumericField {
                    name: "n".into(),
                    value: cloister_types::types::Numeric::Scalar(number),
                }],
                label: label.map(str::to_string),
            };
            let mut theirs = sdk::DataRecord::new(id)
                .with_text("t", "x")
                .with_number("n", number);
            theirs.label = label.map(str::to_string);
            (host, theirs)
        }

        #[test]
        fn on_preprocessed_records() {
            let ids = ["a", "b", "c"];
            let input: Vec<DataRecord> = ids.iter().map(|id| both(id, None, 1.0).0).collect();
            let input_ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
            let outputs: [&[(&str, Option<&str>, f64)]; 7] = [
                &[("a", None, 1.0), ("c", None, 1.0)],
                &[],
                &[("c", None, 1.0), ("a", None, 1.0)],
                &[("a", None, 1.0), ("a", None, 1.0)],
                &[("z", None, 1.0)],
                &[("b", Some("spam"), 1.0)],
                &[("a", None, f64::NAN)],
            ];
            let mut refused = 0;
            for out in outputs {
                let (host, theirs): (Vec<_>, Vec<_>) =
                    out.iter().map(|&(id, l, n)| both(id, l, n)).unzip();
                let words = host_words(preprocessed(&input, &host, 1 << 20));
                refused += usize::from(words.is_some());
                assert_eq!(
                    words,
                    sdk_words(testing::check_preprocessed(&input_ids, &theirs)),
                    "{out:?}"
                );
            }
            assert_eq!(refused, 5, "all but the first two break a rule");
        }

        #[test]
        fn on_decisions() {
            let items = [("a", vec![0.9f32, 0.1]), ("b", vec![0.4, 0.6])];
            let host_items: Vec<PredictionSet> = items
                .iter()
                .map(|(id, p)| PredictionSet {
                    id: id.to_string(),
                    models: vec![p.clone()],
                })
                .collect();
            let sdk_items: Vec<sdk::PredictionSet> = items
                .iter()
                .map(|(id, p)| sdk::PredictionSet::new(*id, vec![p.clone()]))
                .collect();
            // (id, Some(class) = accept / None = review, priority)
            let outputs: [&[(&str, Option<u32>, f32)]; 6] = [
                &[("a", Some(0), 1.0), ("b", None, 0.5)],
                &[("a", Some(0), 1.0)],
                &[("b", None, 1.0), ("a", None, 1.0)],
                &[("a", Some(2), 1.0), ("b", None, 1.0)],
                &[("a", None, f32::NAN), ("b", None, 1.0)],
                &[("a", Some(1), f32::INFINITY), ("b", Some(5), 1.0)],
            ];
            let mut refused = 0;
            for out in outputs {
                let host: Vec<Decision> = out
                    .iter()
                    .map(|&(id, c, priority)| Decision {
                        id: id.into(),
                        action: c.map_or(Action::HumanReview, Action::AutoAccept),
                        priority,
                    })
                    .collect();
                let theirs: Vec<sdk::Decision> = out
                    .iter()
                    .map(|&(id, c, priority)| sdk::Decision {
                        id: id.into(),
                        action: c.map_or(sdk::Action::HumanReview, sdk::Action::AutoAccept),
                        priority,
                    })
                    .collect();
                let words = host_words(decisions(&host_items, 2, &host, 1 << 20));
                refused += usize::from(words.is_some());
                assert_eq!(
                    words,
                    sdk_words(testing::check_decisions(&sdk_items, 2, &theirs)),
                    "{out:?}"
                );
            }
            assert_eq!(refused, 5, "every case but the first breaks a rule");
        }

        #[test]
        fn on_metadata() {
            let key = |name: &str, default: &str, description: &str| {
                (
                    name.to_string(),
                    default.to_string(),
                    description.to_string(),
                )
            };
            let long = "x".repeat(1001);
            let cases = [
                (
                    "ok-name.v2",
                    "1.2.3-rc.1",
                    "Fine.",
                    vec![key("a", "", "a key")],
                ),
                ("Upper", "1.0.0", "", vec![]),
                ("-x", "1.0.0", "", vec![]),
                ("", "1.0.0", "", vec![]),
                ("x", "1.0", "", vec![]),
                ("x", "1.0.0.0", "", vec![]),
                ("x", "1.0.0", "safe\u{202E}txt", vec![]),
                ("x", "1.0.0", long.as_str(), vec![]),
                ("x", "1.0.0", "", vec![key("a", "", ""), key("a", "", "")]),
                ("x", "1.0.0", "", vec![key("A", "", "")]),
                ("x", "1.0.0", "", vec![key("a", "zero\u{200B}width", "")]),
                ("x", "1.0.0", "", vec![key("a", "", "bell\u{7}")]),
                (
                    "x",
                    "1.0.0",
                    "",
                    (0..65).map(|i| key(&format!("k{i}"), "", "")).collect(),
                ),
            ];
            let mut refused = 0;
            for (name, version, description, keys) in cases {
                let host = Metadata {
                    name: name.into(),
                    version: version.into(),
                    kind: cloister_types::types::PluginKind::Featurizer,
                    description: description.into(),
                    config: keys
                        .iter()
                        .map(|(n, d, e)| cloister_types::types::ConfigKey {
                            name: n.clone(),
                            default_value: d.clone(),
                            description: e.clone(),
                        })
                        .collect(),
                };
                let theirs = sdk::Metadata {
                    name: name.into(),
                    version: version.into(),
                    kind: sdk::PluginKind::Featurizer,
                    description: description.into(),
                    config: keys
                        .iter()
                        .map(|(n, d, e)| sdk::ConfigKey::new(n, d, e))
                        .collect(),
                };
                let host = match metadata(&host) {
                    Ok(()) => None,
                    Err(RuntimeError::BadMetadata { field, problem }) => Some((field, problem)),
                    Err(e) => panic!("{e}"),
                };
                let theirs = match testing::check_metadata_of(&theirs) {
                    Ok(()) => None,
                    Err(testing::Refused::Metadata { field, problem }) => Some((field, problem)),
                    Err(e) => panic!("{e}"),
                };
                assert_eq!(host, theirs, "{name} {version} {description}");
                refused += usize::from(host.is_some());
            }
            assert_eq!(refused, 12, "every case but the first breaks a rule");
        }

        #[test]
        fn on_which_characters_metadata_may_hold() {
            for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
                assert_eq!(
                    cloister_types::text::is_deceptive(c),
                    testing::is_deceptive(c),
                    "U+{:04X}",
                    c as u32
                );
            }
        }
    }
}
