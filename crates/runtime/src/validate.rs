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
}
