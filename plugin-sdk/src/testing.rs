//! Running a plugin natively, in its own unit tests, the way the host runs
//! it, and refusing what the host would refuse.
//!
//! `cargo test` builds a plugin crate for the machine, not for wasm: the
//! export macros expand to nothing and the plugin is an ordinary struct.
//! The functions here take it through the steps the host takes — the
//! metadata check of `cloister plugin add`, configuration with the declared
//! defaults, a fitted featurizer's fit (one fresh instance per training
//! record, the keys at least `min_records` records contain), the batch
//! call — and hold what it returns to the interface's rules: ids kept and
//! in order, no label set, one row per record, indices below the dimension,
//! finite numbers, one decision per item, class indices in range. A test
//! that passes here fails in the sandbox only on what only the sandbox
//! measures (fuel, memory, time, output size) or on the component itself
//! (its imports): run `cloister plugin run` on mock data for those.
//!
//! ```
//! use cloister_plugin_sdk::{testing, Config, ConfigKey, Featurizer, Features, Plugin, PluginError, Record};
//!
//! struct Length { field: String }
//!
//! impl Plugin for Length {
//!     const NAME: &'static str = "length";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "Length of a text field in characters";
//!     fn config_keys() -> Vec<ConfigKey> {
//!         vec![ConfigKey::new("field", "text", "the text field")]
//!     }
//!     fn configure(config: &Config) -> Result<Self, PluginError> {
//!         Ok(Length { field: config.get_str("field")?.to_string() })
//!     }
//! }
//!
//! impl Featurizer for Length {
//!     fn dimension(&self) -> u32 { 1 }
//!     fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
//!         let text = record.text(&self.field).ok_or_else(|| PluginError::invalid_input("no text"))?;
//!         out.push(0, text.chars().count() as f32);
//!         Ok(())
//!     }
//! }
//!
//! let mut plugin: Length = testing::configure(&[("field", "body")]).unwrap();
//! let rows = testing::featurize(&mut plugin, &[Record::new("a").with_text("body", "héllo")]).unwrap();
//! assert_eq!(rows, vec![vec![(0, 5.0)]]);
//! // A record without the field: the plugin's own error, as the host would get it.
//! assert!(matches!(
//!     testing::featurize(&mut plugin, &[Record::new("b")]),
//!     Err(testing::Refused::Plugin(_))
//! ));
//! ```

use std::collections::{BTreeMap, HashSet};

use crate::{
    Action, Config, ConfigKey, DataRecord, Decision, Features, Featurizer, FittedFeaturizer,
    Metadata, Plugin, PluginError, PredictionSet, Preprocessor, Selector, SparseBatch, Vocabulary,
};

/// The largest dimension a featurizer may declare under the host's default
/// limits (an environment's administrator may set a lower one).
pub const MAX_DIMENSION: u32 = 1 << 24;

/// The most terms a fit keeps (the most frequent, ties to the smaller key),
/// as the host does.
pub const MAX_TERMS: usize = 1 << 20;

/// What the host would refuse, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// The metadata reviewers see breaks a rule: `cloister plugin add`
    /// refuses the component.
    Metadata {
        /// The field (`name`, `version`, `description`, `config.name`, …).
        field: &'static str,
        /// What it must be.
        problem: &'static str,
    },
    /// The plugin returned an error (or its configuration named an
    /// undeclared key). In an environment, users see only the error's code;
    /// its key and detail go to the administrators' log.
    Plugin(PluginError),
    /// A featurizer declared a dimension of 0 or above [`MAX_DIMENSION`].
    Dimension {
        /// What it declared.
        declared: u32,
    },
    /// The output breaks the interface's rules: the host rejects the whole
    /// batch.
    Output(Violation),
    /// The fit kept no term: none occurs in `min_records` of the training
    /// records.
    EmptyFit {
        /// The fewest records a term must occur in.
        min_records: u32,
        /// Training records given.
        documents: usize,
    },
    /// The test's input is something the host never sends (two records with
    /// one id, a label shown to a preprocessor or featurizer, a prediction
    /// that is not a distribution over the classes): the test is wrong, not
    /// the plugin.
    Input(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Metadata { field, problem } => write!(f, "metadata `{field}` {problem}"),
            Refused::Plugin(e) => write!(f, "the plugin reported an error: {e}"),
            Refused::Dimension { declared } => write!(
                f,
                "the featurizer declared dimension {declared}; it must be 1 to {MAX_DIMENSION}"
            ),
            Refused::Output(v) => write!(f, "the output breaks the plugin interface's rules: {v}"),
            Refused::EmptyFit {
                min_records,
                documents,
            } => write!(
                f,
                "the fit found no term that at least {min_records} of the {documents} training records contain"
            ),
            Refused::Input(what) => write!(f, "the test's input: {what}"),
        }
    }
}

impl std::error::Error for Refused {}

/// How output broke the interface's rules (the host's own list).
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// Wrong number of rows or decisions.
    WrongCount {
        /// One per input record or item.
        expected: usize,
        /// Returned.
        got: usize,
    },
    /// The sparse batch's offsets are malformed.
    BadOffsets,
    /// A feature index is not below the declared dimension.
    IndexOutOfRange {
        /// Row in the batch.
        row: usize,
        /// The index.
        index: u32,
        /// The declared dimension.
        dimension: u32,
    },
    /// A row's indices are not strictly increasing.
    UnsortedIndices {
        /// Row in the batch.
        row: usize,
    },
    /// A NaN or infinite value (a feature, a numeric field or a priority).
    NonFinite {
        /// Row, record or decision in the batch.
        row: usize,
    },
    /// A preprocessor's output record whose id is not an input id in input
    /// order (ids are kept, never invented, repeated or reordered).
    UnknownId {
        /// Position in the output.
        position: usize,
    },
    /// A preprocessor set a label.
    LabelSet {
        /// Position in the output.
        position: usize,
    },
    /// A decision is for another record than the item at its position.
    IdMismatch {
        /// Position.
        position: usize,
    },
    /// A selector accepted a class index that does not exist.
    ClassOutOfRange {
        /// Position.
        position: usize,
        /// The index.
        class: u32,
        /// Number of classes.
        classes: usize,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::WrongCount { expected, got } => {
                write!(f, "expected {expected} results, got {got}")
            }
            Violation::BadOffsets => write!(f, "malformed sparse-batch offsets"),
            Violation::IndexOutOfRange {
                row,
                index,
                dimension,
            } => write!(
                f,
                "row {row}: feature index {index} is out of range for dimension {dimension}"
            ),
            Violation::UnsortedIndices { row } => {
                write!(f, "row {row}: feature indices are not strictly increasing")
            }
            Violation::NonFinite { row } => write!(f, "row {row}: non-finite value"),
            Violation::UnknownId { position } => write!(
                f,
                "output record {position} has an id that is not an input id in input order (ids must be preserved, never invented or reordered)"
            ),
            Violation::LabelSet { position } => write!(
                f,
                "output record {position} carries a label; preprocessors may not set labels"
            ),
            Violation::IdMismatch { position } => write!(
                f,
                "decision {position} is for a different record than the input at that position"
            ),
            Violation::ClassOutOfRange {
                position,
                class,
                classes,
            } => write!(
                f,
                "decision {position} accepts class index {class}, but there are {classes} classes"
            ),
        }
    }
}

/// Checks `T`'s metadata as `cloister plugin add` does, configures it with
/// `pairs` (every other declared key takes its default; an undeclared or
/// repeated key is refused, as the host refuses it before the plugin sees
/// it) and returns the configured plugin.
pub fn configure<T: Plugin>(pairs: &[(&str, &str)]) -> Result<T, Refused> {
    check_metadata::<T>()?;
    let pairs = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = Config::new(&T::config_keys(), pairs).map_err(Refused::Plugin)?;
    T::configure(&config).map_err(Refused::Plugin)
}

/// The checks `cloister plugin add` makes on what reviewers will read: a
/// name of 1–64 characters of `a-z 0-9 - _ .` starting with a letter or
/// digit, a semantic version, a description of at most 1,000 printable
/// characters, at most 64 configuration keys with such names, each once,
/// with printable defaults (at most 64 KiB) and descriptions. Printable
/// means no control, bidirectional or invisible format character.
pub fn check_metadata<T: Plugin>() -> Result<(), Refused> {
    metadata_rules(T::NAME, T::VERSION, T::DESCRIPTION, &T::config_keys())
}

/// [`check_metadata`] on metadata as a component reports it.
pub fn check_metadata_of(m: &Metadata) -> Result<(), Refused> {
    metadata_rules(&m.name, &m.version, &m.description, &m.config)
}

fn metadata_rules(
    name: &str,
    version: &str,
    description: &str,
    keys: &[ConfigKey],
) -> Result<(), Refused> {
    let bad = |field, problem| Err(Refused::Metadata { field, problem });
    const IDENTIFIER: &str = "must be 1-64 characters of a-z, 0-9, '-', '_', '.'";
    const SHORT: &str = "must be at most 1000 printable characters (no control, bidirectional or invisible format characters)";
    if !identifier(name) {
        return bad("name", IDENTIFIER);
    }
    if !semver(version) {
        return bad("version", "must be a semantic version such as 1.2.3");
    }
    if description.chars().count() > 1000 || !printable(description) {
        return bad("description", SHORT);
    }
    if keys.len() > 64 {
        return bad("config", "declares more than 64 keys");
    }
    let mut seen = HashSet::new();
    for k in keys {
        if !identifier(&k.name) {
            return bad("config.name", IDENTIFIER);
        }
        if !seen.insert(k.name.as_str()) {
            return bad("config.name", "declares a key twice");
        }
        if k.default_value.len() > 65536 || !printable(&k.default_value) {
            return bad(
                "config.default-value",
                "must be at most 64 KiB of printable text (no control, bidirectional or invisible format characters)",
            );
        }
        if k.description.chars().count() > 1000 || !printable(&k.description) {
            return bad("config.description", SHORT);
        }
    }
    Ok(())
}

fn identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
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

fn printable(s: &str) -> bool {
    !s.chars().any(is_deceptive)
}

/// A character the host refuses in metadata: a control character, a
/// bidirectional control, or an invisible format character (text that
/// would read differently from what it is).
pub fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{00AD}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200D}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{2060}'..='\u{2064}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// The host's checks on records it sends: distinct ids and, for
/// preprocessors and featurizers, no label.
fn records_as_sent(batch: &[DataRecord]) -> Result<(), Refused> {
    let mut seen = HashSet::new();
    for r in batch {
        if !seen.insert(r.id.as_str()) {
            return Err(Refused::Input(format!(
                "the id `{}` appears twice in one batch",
                r.id
            )));
        }
        if r.label.is_some() {
            return Err(Refused::Input(format!(
                "record `{}` has a label: the host never shows labels to preprocessors and featurizers",
                r.id
            )));
        }
    }
    Ok(())
}

/// Runs a preprocessor over `batch` as the host does and checks its output:
/// ids a subsequence of the input's (kept in order, none invented or
/// repeated), no label, finite numbers.
pub fn process<T: Preprocessor>(
    plugin: &mut T,
    batch: Vec<DataRecord>,
) -> Result<Vec<DataRecord>, Refused> {
    records_as_sent(&batch)?;
    let ids: Vec<String> = batch.iter().map(|r| r.id.clone()).collect();
    let out = plugin.process_batch(batch).map_err(Refused::Plugin)?;
    check_preprocessed(&ids, &out).map_err(Refused::Output)?;
    Ok(out)
}

/// The rules for a preprocessor's output `out` for input ids `input`.
pub fn check_preprocessed(input: &[String], out: &[DataRecord]) -> Result<(), Violation> {
    let mut next = 0usize;
    for (position, r) in out.iter().enumerate() {
        match input[next..].iter().position(|id| *id == r.id) {
            Some(offset) => next += offset + 1,
            None => return Err(Violation::UnknownId { position }),
        }
        if r.label.is_some() {
            return Err(Violation::LabelSet { position });
        }
        if r.numerics
            .iter()
            .any(|n| n.value.as_slice().iter().any(|v| !v.is_finite()))
        {
            return Err(Violation::NonFinite { row: position });
        }
    }
    Ok(())
}

/// Runs a featurizer over `batch` as the host does (its dimension first,
/// then the batch) and checks the rows: one per record, indices below the
/// dimension and strictly increasing, finite values. Returns each row's
/// `(index, value)` pairs in index order.
pub fn featurize<T: Featurizer>(
    plugin: &mut T,
    batch: &[DataRecord],
) -> Result<Vec<Vec<(u32, f32)>>, Refused> {
    records_as_sent(batch)?;
    let dimension = declared_dimension(plugin)?;
    let mut out = Features::with_capacity(batch.len(), 0);
    plugin
        .featurize_batch(batch, &mut out)
        .map_err(Refused::Plugin)?;
    let b = out.into_batch();
    check_features(batch.len(), dimension, &b).map_err(Refused::Output)?;
    Ok(b.offsets
        .windows(2)
        .map(|w| {
            let (a, z) = (w[0] as usize, w[1] as usize);
            b.indices[a..z]
                .iter()
                .copied()
                .zip(b.values[a..z].iter().copied())
                .collect()
        })
        .collect())
}

fn declared_dimension<T: Featurizer>(plugin: &T) -> Result<u32, Refused> {
    match plugin.dimension() {
        0 => Err(Refused::Dimension { declared: 0 }),
        d if d > MAX_DIMENSION => Err(Refused::Dimension { declared: d }),
        d => Ok(d),
    }
}

/// The rules for a featurizer's output `b` for `rows` records of a
/// featurizer of `dimension`.
pub fn check_features(rows: usize, dimension: u32, b: &SparseBatch) -> Result<(), Violation> {
    if b.offsets.len() != rows + 1 {
        return Err(Violation::WrongCount {
            expected: rows,
            got: b.offsets.len().saturating_sub(1),
        });
    }
    if b.offsets[0] != 0
        || b.offsets.windows(2).any(|w| w[0] > w[1])
        || b.offsets[rows] as usize != b.indices.len()
        || b.indices.len() != b.values.len()
    {
        return Err(Violation::BadOffsets);
    }
    for row in 0..rows {
        let (a, z) = (b.offsets[row] as usize, b.offsets[row + 1] as usize);
        let idx = &b.indices[a..z];
        if let Some(&index) = idx.iter().find(|&&i| i >= dimension) {
            return Err(Violation::IndexOutOfRange {
                row,
                index,
                dimension,
            });
        }
        if idx.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Violation::UnsortedIndices { row });
        }
        if b.values[a..z].iter().any(|v| !v.is_finite()) {
            return Err(Violation::NonFinite { row });
        }
    }
    Ok(())
}

/// A fitted featurizer's fit on `training`, as the host makes it: each
/// record's term keys from a fresh instance configured with `pairs` (so
/// nothing carries from one record to the next), counted once per record;
/// the keys at least `min_records` records contain are kept (the
/// environment's `k`, 10 by default; 0 counts as 1), at most
/// [`MAX_TERMS`] of them, the most frequent first (ties: the smaller key).
pub fn fit_vocabulary<T: FittedFeaturizer>(
    pairs: &[(&str, &str)],
    training: &[DataRecord],
    min_records: u32,
) -> Result<Vocabulary, Refused> {
    records_as_sent(training)?;
    let mut df: BTreeMap<u64, u32> = BTreeMap::new();
    for record in training {
        let mut fresh: T = configure(pairs)?;
        let mut keys = Vec::new();
        fresh.terms(record, &mut keys).map_err(Refused::Plugin)?;
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            *df.entry(key).or_insert(0) += 1;
        }
    }
    let k = min_records.max(1);
    let mut kept: Vec<(u64, u32)> = df.into_iter().filter(|&(_, n)| n >= k).collect();
    if kept.is_empty() {
        return Err(Refused::EmptyFit {
            min_records: k,
            documents: training.len(),
        });
    }
    if kept.len() > MAX_TERMS {
        kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        kept.truncate(MAX_TERMS);
        kept.sort_unstable_by_key(|&(key, _)| key);
    }
    Ok(Vocabulary {
        documents: u32::try_from(training.len()).unwrap_or(u32::MAX),
        keys: kept.iter().map(|&(key, _)| key).collect(),
        document_frequencies: kept.iter().map(|&(_, n)| n).collect(),
    })
}

/// A fitted featurizer fitted on `training` ([`fit_vocabulary`]) and ready
/// to featurize: a new instance configured with `pairs` that has loaded the
/// vocabulary and declared a dimension in range.
pub fn fit<T: FittedFeaturizer>(
    pairs: &[(&str, &str)],
    training: &[DataRecord],
    min_records: u32,
) -> Result<T, Refused> {
    let vocabulary = fit_vocabulary::<T>(pairs, training, min_records)?;
    let mut plugin: T = configure(pairs)?;
    plugin.load(&vocabulary).map_err(Refused::Plugin)?;
    declared_dimension(&plugin)?;
    Ok(plugin)
}

/// Runs a selector over `items` as the host does, after the host's checks
/// on its input (classes named and distinct, ids distinct, each item with
/// at least one model's distribution over the classes: as many finite,
/// non-negative values as classes), and checks its decisions: one per item,
/// same ids in order, accepted class indices in range, finite priorities.
pub fn select<T: Selector>(
    plugin: &mut T,
    classes: &[&str],
    items: &[PredictionSet],
) -> Result<Vec<Decision>, Refused> {
    let classes: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    prediction_sets(&classes, items)?;
    let out = plugin
        .select_batch(&classes, items)
        .map_err(Refused::Plugin)?;
    check_decisions(items, classes.len(), &out).map_err(Refused::Output)?;
    Ok(out)
}

fn prediction_sets(classes: &[String], items: &[PredictionSet]) -> Result<(), Refused> {
    let input = |what: String| Err(Refused::Input(what));
    if classes.is_empty() {
        return input("no classes given".into());
    }
    if classes.iter().collect::<HashSet<_>>().len() != classes.len() {
        return input("class names are not distinct".into());
    }
    let mut seen = HashSet::new();
    for p in items {
        if !seen.insert(p.id.as_str()) {
            return input(format!("the id `{}` appears twice in one batch", p.id));
        }
        if p.models.is_empty() {
            return input(format!("item `{}` has no model predictions", p.id));
        }
        for dist in &p.models {
            if dist.len() != classes.len() || dist.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return input(format!(
                    "a prediction of item `{}` is not a distribution over the {} classes",
                    p.id,
                    classes.len()
                ));
            }
        }
    }
    Ok(())
}

/// The rules for a selector's decisions `out` on `items` over `classes`
/// classes.
pub fn check_decisions(
    items: &[PredictionSet],
    classes: usize,
    out: &[Decision],
) -> Result<(), Violation> {
    if out.len() != items.len() {
        return Err(Violation::WrongCount {
            expected: items.len(),
            got: out.len(),
        });
    }
    for (position, (d, p)) in out.iter().zip(items).enumerate() {
        if d.id != p.id {
            return Err(Violation::IdMismatch { position });
        }
        if let Action::AutoAccept(class) = d.action
            && class as usize >= classes
        {
            return Err(Violation::ClassOutOfRange {
                position,
                class,
                classes,
            });
        }
        if !d.priority.is_finite() {
            return Err(Violation::NonFinite { row: position });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Numeric, Verdict};

    /// Words of `text` as features; `bad` picks a way to break the rules.
    struct Words {
        bad: String,
    }

    impl Plugin for Words {
        const NAME: &'static str = "words";
        const VERSION: &'static str = "0.1.0";
        const DESCRIPTION: &'static str = "Word counts in 16 buckets";
        fn config_keys() -> Vec<ConfigKey> {
            vec![ConfigKey::new("bad", "", "how to misbehave")]
        }
        fn configure(config: &Config) -> Result<Self, PluginError> {
            Ok(Words {
                bad: config.get_str("bad")?.to_string(),
            })
        }
    }

    impl Featurizer for Words {
        fn dimension(&self) -> u32 {
            if self.bad == "dimension" { 0 } else { 16 }
        }
        fn featurize(
            &mut self,
            record: &DataRecord,
            out: &mut Features,
        ) -> Result<(), PluginError> {
            let text = record
                .text("text")
                .ok_or_else(|| PluginError::invalid_input("no text"))?;
            for w in text.split_whitespace() {
                out.push((crate::term_key(w) % 16) as u32, 1.0);
            }
            match self.bad.as_str() {
                "index" => out.push(16, 1.0),
                "nan" => out.push(0, f32::NAN),
                _ => {}
            }
            Ok(())
        }
        fn featurize_batch(
            &mut self,
            batch: &[DataRecord],
            out: &mut Features,
        ) -> Result<(), PluginError> {
            let n = if self.bad == "rows" {
                batch.len().saturating_sub(1)
            } else {
                batch.len()
            };
            for record in &batch[..n] {
                self.featurize(record, out)?;
                out.end_row();
            }
            Ok(())
        }
    }

    impl FittedFeaturizer for Words {
        fn terms(&mut self, record: &DataRecord, out: &mut Vec<u64>) -> Result<(), PluginError> {
            for w in record.text("text").unwrap_or_default().split_whitespace() {
                out.push(crate::term_key(w));
            }
            Ok(())
        }
        fn load(&mut self, _vocabulary: &Vocabulary) -> Result<(), PluginError> {
            Ok(())
        }
    }

    fn text(id: &str, t: &str) -> DataRecord {
        DataRecord::new(id).with_text("text", t)
    }

    fn output(r: Result<impl std::fmt::Debug, Refused>) -> Violation {
        match r {
            Err(Refused::Output(v)) => v,
            other => panic!("expected an output violation, got {other:?}"),
        }
    }

    #[test]
    fn a_featurizer_is_configured_run_and_held_to_the_rules() {
        let mut ok: Words = configure(&[]).unwrap();
        let rows = featurize(&mut ok, &[text("a", "x y x"), text("b", "")]).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].iter().map(|&(_, v)| v).sum::<f32>(), 3.0);
        assert!(rows[1].is_empty());
        let mut bad: Words = configure(&[("bad", "index")]).unwrap();
        assert_eq!(
            output(featurize(&mut bad, &[text("a", "x")])),
            Violation::IndexOutOfRange {
                row: 0,
                index: 16,
                dimension: 16
            }
        );
        let mut bad: Words = configure(&[("bad", "nan")]).unwrap();
        assert_eq!(
            output(featurize(&mut bad, &[text("a", "x")])),
            Violation::NonFinite { row: 0 }
        );
        let mut bad: Words = configure(&[("bad", "rows")]).unwrap();
        assert_eq!(
            output(featurize(&mut bad, &[text("a", "x"), text("b", "y")])),
            Violation::WrongCount {
                expected: 2,
                got: 1
            }
        );
        let mut bad: Words = configure(&[("bad", "dimension")]).unwrap();
        assert_eq!(
            featurize(&mut bad, &[text("a", "x")]),
            Err(Refused::Dimension { declared: 0 })
        );
        // The plugin's own error, an undeclared key, and input the host never sends.
        assert!(matches!(
            featurize(&mut ok, &[DataRecord::new("a")]),
            Err(Refused::Plugin(_))
        ));
        assert!(
            matches!(configure::<Words>(&[("nope", "1")]), Err(Refused::Plugin(e)) if e.key.as_deref() == Some("nope"))
        );
        assert!(matches!(
            featurize(&mut ok, &[text("a", "x"), text("a", "y")]),
            Err(Refused::Input(_))
        ));
        let mut labeled = text("a", "x");
        labeled.label = Some("spam".into());
        assert!(matches!(
            featurize(&mut ok, &[labeled]),
            Err(Refused::Input(_))
        ));
    }

    #[test]
    fn a_fit_counts_each_record_once_and_keeps_what_enough_records_contain() {
        let training = [text("a", "x x y"), text("b", "x z"), text("c", "x y")];
        let v = fit_vocabulary::<Words>(&[], &training, 2).unwrap();
        assert_eq!(v.documents, 3);
        let mut want = [(crate::term_key("x"), 3), (crate::term_key("y"), 2)];
        want.sort();
        assert_eq!(v.keys, want.iter().map(|w| w.0).collect::<Vec<_>>());
        assert_eq!(
            v.document_frequencies,
            want.iter().map(|w| w.1).collect::<Vec<_>>()
        );
        assert_eq!(
            fit_vocabulary::<Words>(&[], &training, 4),
            Err(Refused::EmptyFit {
                min_records: 4,
                documents: 3
            })
        );
        let mut fitted: Words = fit(&[], &training, 2).unwrap();
        assert_eq!(featurize(&mut fitted, &[text("d", "x")]).unwrap().len(), 1);
    }

    struct Keep {
        bad: String,
    }

    impl Plugin for Keep {
        const NAME: &'static str = "keep";
        const VERSION: &'static str = "1.0.0";
        const DESCRIPTION: &'static str = "Keeps records with text";
        fn config_keys() -> Vec<ConfigKey> {
            vec![ConfigKey::new("bad", "", "how to misbehave")]
        }
        fn configure(config: &Config) -> Result<Self, PluginError> {
            Ok(Keep {
                bad: config.get_str("bad")?.to_string(),
            })
        }
    }

    impl Preprocessor for Keep {
        fn process(&mut self, record: DataRecord) -> Result<Option<DataRecord>, PluginError> {
            Ok(record.text("text").is_some().then_some(record))
        }
        fn process_batch(
            &mut self,
            batch: Vec<DataRecord>,
        ) -> Result<Vec<DataRecord>, PluginError> {
            let mut out = Vec::new();
            for r in batch {
                if let Some(r) = self.process(r)? {
                    out.push(r);
                }
            }
            match self.bad.as_str() {
                "reorder" => out.reverse(),
                "invent" => out.push(DataRecord::new("new")),
                "repeat" => out.push(out[0].clone()),
                "label" => out[0].label = Some("spam".into()),
                "nan" => out[0] = out[0].clone().with_number("n", f64::INFINITY),
                _ => {}
            }
            Ok(out)
        }
    }

    #[test]
    fn a_preprocessor_keeps_ids_in_order_and_sets_no_label() {
        let batch = || {
            vec![
                text("a", "x"),
                DataRecord::new("b"),
                text("c", "y").with_number("n", 1.0),
            ]
        };
        let mut ok: Keep = configure(&[]).unwrap();
        let out = process(&mut ok, batch()).unwrap();
        assert_eq!(
            out.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(out[1].numeric("n"), Some(&Numeric::Scalar(1.0)));
        for (bad, want) in [
            ("reorder", Violation::UnknownId { position: 1 }),
            ("invent", Violation::UnknownId { position: 2 }),
            ("repeat", Violation::UnknownId { position: 2 }),
            ("label", Violation::LabelSet { position: 0 }),
            ("nan", Violation::NonFinite { row: 0 }),
        ] {
            let mut p: Keep = configure(&[("bad", bad)]).unwrap();
            assert_eq!(output(process(&mut p, batch())), want, "{bad}");
        }
    }

    struct Agree {
        bad: String,
    }

    impl Plugin for Agree {
        const NAME: &'static str = "agree";
        const VERSION: &'static str = "1.0.0";
        const DESCRIPTION: &'static str = "Accepts what every model's top class agrees on";
        fn config_keys() -> Vec<ConfigKey> {
            vec![ConfigKey::new("bad", "", "how to misbehave")]
        }
        fn configure(config: &Config) -> Result<Self, PluginError> {
            Ok(Agree {
                bad: config.get_str("bad")?.to_string(),
            })
        }
    }

    impl Selector for Agree {
        fn select(
            &mut self,
            _classes: &[String],
            item: &PredictionSet,
        ) -> Result<Verdict, PluginError> {
            let tops: Vec<usize> = item
                .models
                .iter()
                .filter_map(|m| crate::stats::argmax(m).map(|(i, _)| i))
                .collect();
            let action = match (self.bad.as_str(), tops.windows(2).all(|w| w[0] == w[1])) {
                ("class", _) => Action::AutoAccept(99),
                (_, true) => Action::AutoAccept(tops[0] as u32),
                (_, false) => Action::HumanReview,
            };
            let priority = if self.bad == "nan" { f32::NAN } else { 1.0 };
            Ok(Verdict { action, priority })
        }
    }

    #[test]
    fn a_selector_decides_once_per_item_within_the_classes() {
        let items = [
            PredictionSet::new("a", vec![vec![0.9, 0.1], vec![0.8, 0.2]]),
            PredictionSet::new("b", vec![vec![0.9, 0.1], vec![0.2, 0.8]]),
        ];
        let mut ok: Agree = configure(&[]).unwrap();
        let d = select(&mut ok, &["ham", "spam"], &items).unwrap();
        assert_eq!(
            (d[0].action, d[1].action),
            (Action::AutoAccept(0), Action::HumanReview)
        );
        let mut bad: Agree = configure(&[("bad", "class")]).unwrap();
        assert_eq!(
            output(select(&mut bad, &["ham", "spam"], &items)),
            Violation::ClassOutOfRange {
                position: 0,
                class: 99,
                classes: 2
            }
        );
        let mut bad: Agree = configure(&[("bad", "nan")]).unwrap();
        assert_eq!(
            output(select(&mut bad, &["ham", "spam"], &items)),
            Violation::NonFinite { row: 0 }
        );
        // Three values for two classes: the test's input is wrong.
        let wrong = [PredictionSet::new("a", vec![vec![0.5, 0.25, 0.25]])];
        assert!(matches!(
            select(&mut ok, &["ham", "spam"], &wrong),
            Err(Refused::Input(_))
        ));
    }

    #[test]
    fn metadata_is_checked_as_plugin_add_checks_it() {
        let key = |name: &str| ConfigKey::new(name, "", "a key");
        assert_eq!(
            metadata_rules("ok-name.v2", "1.2.3-rc.1", "Fine.", &[key("a")]),
            Ok(())
        );
        let field = |r: Result<(), Refused>| match r {
            Err(Refused::Metadata { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(metadata_rules("Upper", "1.0.0", "", &[])), "name");
        assert_eq!(field(metadata_rules("-x", "1.0.0", "", &[])), "name");
        assert_eq!(field(metadata_rules("x", "1.0", "", &[])), "version");
        assert_eq!(
            field(metadata_rules("x", "1.0.0", "safe\u{202E}txt", &[])),
            "description"
        );
        assert_eq!(
            field(metadata_rules("x", "1.0.0", "", &[key("a"), key("a")])),
            "config.name"
        );
        let mut hidden = key("a");
        hidden.default_value = "zero\u{200B}width".into();
        assert_eq!(
            field(metadata_rules("x", "1.0.0", "", &[hidden])),
            "config.default-value"
        );
    }

    #[test]
    fn the_record_builders_replace_a_field_of_the_same_name() {
        let r = DataRecord::new("r")
            .with_text("t", "one")
            .with_text("t", "two")
            .with_vector("px", vec![1.0, 2.0])
            .with_number("px", 3.0);
        assert_eq!(r.texts.len(), 1);
        assert_eq!(r.text("t"), Some("two"));
        assert_eq!(r.numeric("px").map(Numeric::as_slice), Some(&[3.0][..]));
        assert_eq!(r.label, None);
    }
}
