//! The WIT `cloister:plugin/types` interface as Rust types.
//!
//! These have exactly the shape wit-bindgen would generate for
//! `wit/plugin.wit`; the export macros tell wit-bindgen to use them instead of
//! generating copies, so plugins and the SDK share one set of types.

/// A numeric field value: one number or a vector (e.g. 64 pixels).
#[derive(Debug, Clone, PartialEq)]
pub enum Numeric {
    /// A single number.
    Scalar(f64),
    /// A vector of numbers.
    Vector(Vec<f64>),
}

/// A named text field of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct TextField {
    /// Field name.
    pub name: String,
    /// Field value.
    pub value: String,
}

/// A named numeric field of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct NumericField {
    /// Field name.
    pub name: String,
    /// Field value.
    pub value: Numeric,
}

/// One data record. The host assigns `id`; `label` is always `None` for
/// preprocessors and featurizers.
#[derive(Debug, Clone, PartialEq)]
pub struct DataRecord {
    /// Record id, unique within a batch.
    pub id: String,
    /// Named text fields.
    pub texts: Vec<TextField>,
    /// Named numeric fields.
    pub numerics: Vec<NumericField>,
    /// The label, where the host shows it.
    pub label: Option<String>,
}

/// The three plugin kinds.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Records to records.
    Preprocessor,
    /// Records to sparse feature vectors.
    Featurizer,
    /// Model predictions to labeling decisions.
    Selector,
}

/// A configuration key a plugin accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigKey {
    /// Key name.
    pub name: String,
    /// Value used when the key is not given.
    pub default_value: String,
    /// What the key means.
    pub description: String,
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// Plugin name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Plugin kind.
    pub kind: PluginKind,
    /// One sentence for reviewers.
    pub description: String,
    /// Accepted configuration keys.
    pub config: Vec<ConfigKey>,
}

/// Fixed error codes; users see only the code.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A configuration value is malformed or out of range.
    InvalidConfig,
    /// A record lacks a needed field, or a field has a bad value.
    InvalidInput,
    /// The plugin cannot handle this input.
    Unsupported,
    /// A bug in the plugin.
    Internal,
}

/// A plugin's error. `detail` goes to the administrators' log only.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginError {
    /// The fixed error code.
    pub code: ErrorCode,
    /// For `InvalidConfig`: the offending key.
    pub key: Option<String>,
    /// Free text for administrators.
    pub detail: String,
}

/// Feature vectors of a batch in compressed-sparse-row form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseBatch {
    /// Row `i` spans `offsets[i]..offsets[i + 1]`; starts with 0.
    pub offsets: Vec<u32>,
    /// Feature indices, strictly increasing within a row.
    pub indices: Vec<u32>,
    /// Feature values, finite.
    pub values: Vec<f32>,
}

/// What a fitted featurizer learnt from the training split, as the host
/// counted it: term keys, strictly increasing, with the number of training
/// records containing each. Every count is at least the environment's
/// minimum cell size, so no term singles out a record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vocabulary {
    /// Training records the terms were counted over.
    pub documents: u32,
    /// Term keys, strictly increasing.
    pub keys: Vec<u64>,
    /// `document_frequencies[i]` training records contain `keys[i]`.
    pub document_frequencies: Vec<u32>,
}

/// The predictions of two or more models for one record.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionSet {
    /// Record id.
    pub id: String,
    /// One probability distribution per model.
    pub models: Vec<Vec<f32>>,
}

/// What to do with one record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Accept this class index as the label.
    AutoAccept(u32),
    /// Send to a human labeler.
    HumanReview,
    /// Leave in the pool.
    Skip,
}

/// A selector's decision for one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Record id.
    pub id: String,
    /// The action.
    pub action: Action,
    /// Priority for human review; higher first.
    pub priority: f32,
}
