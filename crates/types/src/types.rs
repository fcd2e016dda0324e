//! The data types exchanged with plugins.
//!
//! They mirror the WIT interface `cloister:plugin/types` in
//! `plugin-sdk/wit/plugin.wit`: the runtime's generated bindings use these
//! very types (wasmtime checks their shape against the component when a
//! plugin is loaded), so records cross into a plugin without conversion.
//! The wasmtime derives exist only with the `component` feature, which the
//! runtime crate alone turns on: training, the store and the service use
//! these types without depending on wasmtime.

use serde::{Deserialize, Serialize};
#[cfg(feature = "component")]
use wasmtime::component::{ComponentType, Lift, Lower};

/// A numeric field value: one number or a vector (e.g. 64 pixels).
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(variant))]
#[serde(untagged)]
pub enum Numeric {
    /// A single number.
    #[cfg_attr(feature = "component", component(name = "scalar"))]
    Scalar(f64),
    /// A vector of numbers.
    #[cfg_attr(feature = "component", component(name = "vector"))]
    Vector(Vec<f64>),
}

impl Numeric {
    /// The values as a slice: one element for a scalar.
    pub fn as_slice(&self) -> &[f64] {
        match self {
            Numeric::Scalar(v) => std::slice::from_ref(v),
            Numeric::Vector(v) => v,
        }
    }
}

/// A named text field.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "component", component(record))]
pub struct TextField {
    /// Field name.
    pub name: String,
    /// Field value.
    pub value: String,
}

/// A named numeric field.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "component", component(record))]
pub struct NumericField {
    /// Field name.
    pub name: String,
    /// Field value.
    pub value: Numeric,
}

/// One data record.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "component", component(record))]
pub struct DataRecord {
    /// Unique id within its dataset.
    pub id: String,
    /// Named text fields.
    pub texts: Vec<TextField>,
    /// Named numeric fields.
    pub numerics: Vec<NumericField>,
    /// The label, if known. Never shown to preprocessors and featurizers.
    pub label: Option<String>,
}

impl DataRecord {
    /// The value of text field `name`.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.texts
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.as_str())
    }

    /// The value of numeric field `name`.
    pub fn numeric(&self, name: &str) -> Option<&Numeric> {
        self.numerics
            .iter()
            .find(|f| f.name == name)
            .map(|f| &f.value)
    }
}

/// The three plugin kinds.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(enum))]
#[repr(u8)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Records to records.
    #[cfg_attr(feature = "component", component(name = "preprocessor"))]
    Preprocessor,
    /// Records to sparse feature vectors.
    #[cfg_attr(feature = "component", component(name = "featurizer"))]
    Featurizer,
    /// Model predictions to labeling decisions.
    #[cfg_attr(feature = "component", component(name = "selector"))]
    Selector,
}

impl PluginKind {
    /// The kind's name as in the WIT world.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Preprocessor => "preprocessor",
            PluginKind::Featurizer => "featurizer",
            PluginKind::Selector => "selector",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configuration key a plugin declares.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(record))]
pub struct ConfigKey {
    /// Key name.
    pub name: String,
    /// Default value.
    #[cfg_attr(feature = "component", component(name = "default-value"))]
    pub default_value: String,
    /// Meaning.
    pub description: String,
}

/// What a plugin says about itself.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(record))]
pub struct Metadata {
    /// Plugin name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Kind.
    pub kind: PluginKind,
    /// Description for reviewers.
    pub description: String,
    /// Accepted configuration keys.
    pub config: Vec<ConfigKey>,
}

/// A plugin's fixed error code: the only part of a plugin error users see.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(enum))]
#[repr(u8)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// A configuration value is malformed or out of range.
    #[cfg_attr(feature = "component", component(name = "invalid-config"))]
    InvalidConfig,
    /// A record lacks a needed field or has a bad value.
    #[cfg_attr(feature = "component", component(name = "invalid-input"))]
    InvalidInput,
    /// The plugin cannot handle the input.
    #[cfg_attr(feature = "component", component(name = "unsupported"))]
    Unsupported,
    /// A bug in the plugin.
    #[cfg_attr(feature = "component", component(name = "internal"))]
    Internal,
}

impl ErrorCode {
    /// The code as written in the WIT file.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidConfig => "invalid-config",
            ErrorCode::InvalidInput => "invalid-input",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A plugin's error as it crosses the boundary. `detail` is plugin-written
/// text: it goes to the administrators' plugin log, never to users.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "component", component(record))]
pub struct PluginError {
    /// The fixed code.
    pub code: ErrorCode,
    /// For `invalid-config`: the key the plugin blames.
    pub key: Option<String>,
    /// Free text for administrators.
    pub detail: String,
}

/// Sparse feature vectors of a batch in compressed-sparse-row form.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "component", component(record))]
pub struct SparseBatch {
    /// Row `i` spans `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<u32>,
    /// Feature indices.
    pub indices: Vec<u32>,
    /// Feature values.
    pub values: Vec<f32>,
}

impl SparseBatch {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Row `i` as (indices, values).
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (&self.indices[a..b], &self.values[a..b])
    }

    /// Append all rows of `other`.
    pub fn extend(&mut self, other: &SparseBatch) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        let base = self.indices.len() as u32;
        self.indices.extend_from_slice(&other.indices);
        self.values.extend_from_slice(&other.values);
        self.offsets
            .extend(other.offsets.iter().skip(1).map(|o| o + base));
    }
}

/// What a fitted featurizer learnt from the training split, as the host
/// counted it: term keys, strictly increasing, with the number of training
/// records containing each (every count at least the environment's k).
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "component", component(record))]
pub struct Vocabulary {
    /// Training records the terms were counted over.
    pub documents: u32,
    /// Term keys, strictly increasing.
    pub keys: Vec<u64>,
    /// Training records containing each key.
    #[cfg_attr(feature = "component", component(name = "document-frequencies"))]
    pub document_frequencies: Vec<u32>,
}

/// The predictions of two or more models for one record.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(record))]
pub struct PredictionSet {
    /// Record id.
    pub id: String,
    /// One probability distribution per model.
    pub models: Vec<Vec<f32>>,
}

/// What to do with one record.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(variant))]
#[serde(rename_all = "kebab-case", tag = "action", content = "class")]
pub enum Action {
    /// Accept this class index as the label.
    #[cfg_attr(feature = "component", component(name = "auto-accept"))]
    AutoAccept(u32),
    /// Send to a human labeler.
    #[cfg_attr(feature = "component", component(name = "human-review"))]
    HumanReview,
    /// Leave in the pool.
    #[cfg_attr(feature = "component", component(name = "skip"))]
    Skip,
}

/// A selector's decision for one record.
#[cfg_attr(feature = "component", derive(ComponentType, Lift, Lower))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "component", component(record))]
pub struct Decision {
    /// Record id.
    pub id: String,
    /// The action.
    pub action: Action,
    /// Priority for human review, higher first.
    pub priority: f32,
}

/// A stage of preparing data that finished: what it made, how many, and
/// of what — `featurized: 11293 records`, `fitted vocabulary: 35800
/// terms` — so that whoever shows progress names the right unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    /// The stage (`read`, `preprocessed`, `fitted vocabulary`, …).
    pub what: &'static str,
    /// How many of `unit` it made.
    pub n: usize,
    /// What `n` counts: `records` or `terms`.
    pub unit: &'static str,
}

impl Stage {
    /// A stage that made `n` records.
    pub fn records(what: &'static str, n: usize) -> Self {
        Self {
            what,
            n,
            unit: "records",
        }
    }

    /// A stage that made a vocabulary of `n` terms.
    pub fn terms(what: &'static str, n: usize) -> Self {
        Self {
            what,
            n,
            unit: "terms",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.what, self.n, self.unit)
    }
}
