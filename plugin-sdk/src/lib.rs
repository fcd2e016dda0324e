//! # The Cloister plugin SDK
//!
//! Write Cloister plugins — preprocessors, featurizers and selectors — in plain
//! Rust and build them as WebAssembly components with
//! `cargo build --release --target wasm32-wasip2`. A plugin is a struct, an
//! implementation of [`Plugin`] plus one kind trait, and one export macro:
//!
//! ```
//! use cloister_plugin_sdk::{Config, Featurizer, Features, Plugin, PluginError, Record};
//!
//! /// One feature: the length of the `text` field in characters.
//! pub struct TextLength;
//!
//! impl Plugin for TextLength {
//!     const NAME: &'static str = "text-length";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "Length of the text field in characters";
//!     fn configure(_config: &Config) -> Result<Self, PluginError> {
//!         Ok(TextLength)
//!     }
//! }
//!
//! impl Featurizer for TextLength {
//!     fn dimension(&self) -> u32 {
//!         1
//!     }
//!     fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
//!         let text = record.text("text").unwrap_or_default();
//!         out.push(0, text.chars().count() as f32);
//!         Ok(())
//!     }
//! }
//!
//! cloister_plugin_sdk::export_featurizer!(TextLength);
//! ```
//!
//! The export macros expand to nothing on targets other than `wasm32`, so the
//! same crate also builds natively: unit-test your logic with `cargo test`.
//!
//! The interface itself is `wit/plugin.wit` in this crate; you never need to
//! read it, but it is the contract the host enforces. See
//! `docs/plugin-authoring.md` in the Cloister repository for the tutorial,
//! the limits and the error codes.

#![forbid(unsafe_code)]

mod config;
mod features;
pub mod stats;
pub mod testing;
pub mod types;

pub use config::Config;
pub use features::Features;
pub use types::{
    Action, ConfigKey, DataRecord, Decision, ErrorCode, Metadata, Numeric, NumericField,
    PluginError, PluginKind, PredictionSet, SparseBatch, TextField, Vocabulary,
};

/// A data record as plugins see it (the WIT `data-record`).
pub type Record = DataRecord;

/// What every plugin implements: its identity and how it is configured.
pub trait Plugin: Sized + 'static {
    /// The plugin's name, e.g. `"hashed-ngrams"`.
    const NAME: &'static str;
    /// Its semantic version; `env!("CARGO_PKG_VERSION")` is a good choice.
    const VERSION: &'static str;
    /// One sentence for reviewers.
    const DESCRIPTION: &'static str;

    /// The configuration keys the plugin accepts, with defaults and meaning.
    /// The host rejects any other key before the plugin sees it.
    fn config_keys() -> Vec<ConfigKey> {
        Vec::new()
    }

    /// Build the plugin from its configuration. Every declared key is present
    /// (defaults filled in). Return [`PluginError::invalid_config`] naming the
    /// key when a value is unusable.
    fn configure(config: &Config) -> Result<Self, PluginError>;

    /// The plugin's metadata for a given kind; used by the export macros.
    fn metadata(kind: PluginKind) -> Metadata {
        Metadata {
            name: Self::NAME.to_string(),
            version: Self::VERSION.to_string(),
            kind,
            description: Self::DESCRIPTION.to_string(),
            config: Self::config_keys(),
        }
    }
}

/// A preprocessor rewrites or drops records. Ids must be preserved in order
/// and never invented; labels are never shown to preprocessors.
pub trait Preprocessor: Plugin {
    /// Process one record: `Ok(Some(record))` keeps it (possibly rewritten),
    /// `Ok(None)` drops it.
    fn process(&mut self, record: Record) -> Result<Option<Record>, PluginError>;

    /// Process a whole batch. The default calls [`Preprocessor::process`] for
    /// each record; override it only for batch-level logic.
    fn process_batch(&mut self, batch: Vec<Record>) -> Result<Vec<Record>, PluginError> {
        let mut out = Vec::with_capacity(batch.len());
        for record in batch {
            if let Some(kept) = self.process(record)? {
                out.push(kept);
            }
        }
        Ok(out)
    }
}

/// A featurizer maps each record to a sparse feature vector of a fixed
/// dimension. Labels are never shown to featurizers.
pub trait Featurizer: Plugin {
    /// The dimension of the feature space.
    fn dimension(&self) -> u32;

    /// Write the features of one record into `out` with [`Features::push`].
    /// Order does not matter; repeated indices are summed.
    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError>;

    /// Post-process one finished row (sorted, repeated indices summed), e.g.
    /// to apply sublinear term frequency or L2 normalisation. The default does
    /// nothing.
    fn finish_row(&self, _indices: &[u32], _values: &mut [f32]) {}

    /// Featurize a whole batch: one row per record, in order. The default calls
    /// [`Featurizer::featurize`], [`Features::end_row`] and
    /// [`Featurizer::finish_row`] for each record.
    fn featurize_batch(&mut self, batch: &[Record], out: &mut Features) -> Result<(), PluginError> {
        for record in batch {
            self.featurize(record, out)?;
            out.end_row();
            let (indices, values) = out.last_row_mut();
            self.finish_row(indices, values);
        }
        Ok(())
    }
}

/// A featurizer that learns from the training split before it featurizes
/// (a vocabulary, document frequencies), exported with
/// [`export_fitted_featurizer!`].
///
/// Fitting is split between plugin and host: the plugin names the term
/// keys each training record contains ([`FittedFeaturizer::terms`], one
/// record per fresh instance), the host counts them and keeps the keys
/// that at least k records contain (k is the environment's minimum cell
/// size, 10 by default), and every instance that featurizes first receives
/// that [`Vocabulary`] ([`FittedFeaturizer::load`]). The plugin never sees
/// the counts of a key fewer than k records contain, nor any label; what
/// it learns is stored with the model and travels with it. Make keys with
/// [`term_key`].
pub trait FittedFeaturizer: Featurizer {
    /// Push the term keys of one training record into `out` (any order;
    /// repeats count once).
    fn terms(&mut self, record: &Record, out: &mut Vec<u64>) -> Result<(), PluginError>;

    /// Take the fitted vocabulary. Called once per instance, after
    /// `configure` and before [`Featurizer::dimension`] and
    /// [`Featurizer::featurize`], which may depend on it.
    fn load(&mut self, vocabulary: &Vocabulary) -> Result<(), PluginError>;
}

/// A stable 64-bit key for a term (FNV-1a over its UTF-8 bytes): the same
/// term gives the same key in every instance, build and platform.
pub fn term_key(term: &str) -> u64 {
    term_key_parts(&[term])
}

/// [`term_key`] of terms joined by single spaces, without building the
/// joined string: `term_key_parts(&["new", "york"]) == term_key("new york")`.
pub fn term_key_parts(parts: &[&str]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h = (h ^ u64::from(b' ')).wrapping_mul(PRIME);
        }
        for &b in part.as_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
    }
    h
}

/// A selector's verdict on one record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// What to do with the record.
    pub action: Action,
    /// Higher is more urgent for human review.
    pub priority: f32,
}

/// A selector decides, from the predictions of two or more models, whether a
/// record's label is accepted automatically, sent to a human, or skipped.
pub trait Selector: Plugin {
    /// Decide for one record. `classes` names the classes; each distribution
    /// in `item.models` ranges over them.
    fn select(&mut self, classes: &[String], item: &PredictionSet) -> Result<Verdict, PluginError>;

    /// Decide for a batch, one decision per item in order. The default calls
    /// [`Selector::select`] for each item.
    fn select_batch(
        &mut self,
        classes: &[String],
        batch: &[PredictionSet],
    ) -> Result<Vec<Decision>, PluginError> {
        batch
            .iter()
            .map(|item| {
                let verdict = self.select(classes, item)?;
                Ok(Decision {
                    id: item.id.clone(),
                    action: verdict.action,
                    priority: verdict.priority,
                })
            })
            .collect()
    }
}

impl DataRecord {
    /// A record with this id and no fields, for tests and for plugins that
    /// build records (the host assigns the ids of the records it sends).
    pub fn new(id: impl Into<String>) -> Self {
        DataRecord {
            id: id.into(),
            texts: Vec::new(),
            numerics: Vec::new(),
            label: None,
        }
    }

    /// This record with the text field `name` set to `value` (replacing a
    /// field of that name).
    pub fn with_text(mut self, name: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.texts.iter_mut().find(|f| f.name == name) {
            Some(f) => f.value = value,
            None => self.texts.push(TextField {
                name: name.to_string(),
                value,
            }),
        }
        self
    }

    /// This record with the numeric field `name` set to one number.
    pub fn with_number(self, name: &str, value: f64) -> Self {
        self.with_numeric(name, Numeric::Scalar(value))
    }

    /// This record with the numeric field `name` set to a vector.
    pub fn with_vector(self, name: &str, values: Vec<f64>) -> Self {
        self.with_numeric(name, Numeric::Vector(values))
    }

    fn with_numeric(mut self, name: &str, value: Numeric) -> Self {
        match self.numerics.iter_mut().find(|f| f.name == name) {
            Some(f) => f.value = value,
            None => self.numerics.push(NumericField {
                name: name.to_string(),
                value,
            }),
        }
        self
    }

    /// The value of the text field `name`, if present.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.texts
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.as_str())
    }

    /// The value of the numeric field `name`, if present.
    pub fn numeric(&self, name: &str) -> Option<&Numeric> {
        self.numerics
            .iter()
            .find(|f| f.name == name)
            .map(|f| &f.value)
    }
}

impl PredictionSet {
    /// The predictions of several models for record `id`: one
    /// distribution over the classes per model.
    pub fn new(id: impl Into<String>, models: Vec<Vec<f32>>) -> Self {
        PredictionSet {
            id: id.into(),
            models,
        }
    }
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

impl ConfigKey {
    /// A configuration key with its default value and description.
    pub fn new(name: &str, default_value: &str, description: &str) -> Self {
        ConfigKey {
            name: name.to_string(),
            default_value: default_value.to_string(),
            description: description.to_string(),
        }
    }
}

impl PluginError {
    fn with(code: ErrorCode, key: Option<&str>, detail: impl Into<String>) -> Self {
        PluginError {
            code,
            key: key.map(str::to_string),
            detail: detail.into(),
        }
    }

    /// A configuration value is unusable; `key` names it.
    pub fn invalid_config(key: &str, detail: impl Into<String>) -> Self {
        Self::with(ErrorCode::InvalidConfig, Some(key), detail)
    }

    /// A record lacks a needed field or has a bad value.
    pub fn invalid_input(detail: impl Into<String>) -> Self {
        Self::with(ErrorCode::InvalidInput, None, detail)
    }

    /// The input is of a shape the plugin does not handle.
    pub fn unsupported(detail: impl Into<String>) -> Self {
        Self::with(ErrorCode::Unsupported, None, detail)
    }

    /// A bug in the plugin.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::with(ErrorCode::Internal, None, detail)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{:?} ({key}): {}", self.code, self.detail),
            None => write!(f, "{:?}: {}", self.code, self.detail),
        }
    }
}

impl std::error::Error for PluginError {}

// The generated `__cloister_generate_<world>!` macros (see build.rs).
include!(concat!(env!("OUT_DIR"), "/generate.rs"));

/// Implementation details of the export macros. Not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::{
        Config, DataRecord, Decision, Features, Featurizer, FittedFeaturizer, Metadata, Plugin,
        PluginError, PluginKind, PredictionSet, Preprocessor, Selector, SparseBatch, Vocabulary,
    };
    use std::any::Any;
    use std::cell::RefCell;

    pub use wit_bindgen;

    thread_local! {
        /// The configured plugin of this instance. A component instance is
        /// single-threaded and hosts exactly one plugin.
        static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    fn with_instance<T: 'static, R>(
        f: impl FnOnce(&mut T) -> Result<R, PluginError>,
    ) -> Result<R, PluginError> {
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_mut().and_then(|b| b.downcast_mut::<T>()) {
                Some(plugin) => f(plugin),
                None => Err(PluginError::internal("plugin called before configure")),
            }
        })
    }

    pub fn metadata<T: Plugin>(kind: PluginKind) -> Metadata {
        T::metadata(kind)
    }

    pub fn configure<T: Plugin>(pairs: Vec<(String, String)>) -> Result<(), PluginError> {
        let config = Config::new(&T::config_keys(), pairs)?;
        let plugin = T::configure(&config)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }

    pub fn process<T: Preprocessor>(
        batch: Vec<DataRecord>,
    ) -> Result<Vec<DataRecord>, PluginError> {
        with_instance::<T, _>(|p| p.process_batch(batch))
    }

    pub fn dimension<T: Featurizer>() -> u32 {
        with_instance::<T, _>(|p| Ok(p.dimension())).unwrap_or(0)
    }

    pub fn featurize<T: Featurizer>(batch: Vec<DataRecord>) -> Result<SparseBatch, PluginError> {
        with_instance::<T, _>(|p| {
            let mut out = Features::with_capacity(batch.len(), 0);
            p.featurize_batch(&batch, &mut out)?;
            Ok(out.into_batch())
        })
    }

    pub fn terms<T: FittedFeaturizer>(record: DataRecord) -> Result<Vec<u64>, PluginError> {
        with_instance::<T, _>(|p| {
            let mut out = Vec::new();
            p.terms(&record, &mut out)?;
            Ok(out)
        })
    }

    pub fn load<T: FittedFeaturizer>(vocabulary: Vocabulary) -> Result<(), PluginError> {
        with_instance::<T, _>(|p| p.load(&vocabulary))
    }

    pub fn select<T: Selector>(
        classes: Vec<String>,
        batch: Vec<PredictionSet>,
    ) -> Result<Vec<Decision>, PluginError> {
        with_instance::<T, _>(|p| p.select_batch(&classes, &batch))
    }
}

/// Export a [`Preprocessor`] as the component's plugin. Expands to nothing on
/// non-wasm targets.
#[macro_export]
macro_rules! export_preprocessor {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        mod __cloister_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__cloister_generate_preprocessor!();
            struct Export;
            impl exports::cloister::plugin::plugin::Guest for Export {
                fn describe() -> $crate::Metadata {
                    $crate::__private::metadata::<$plugin>($crate::PluginKind::Preprocessor)
                }
                fn configure(config: Vec<(String, String)>) -> Result<(), $crate::PluginError> {
                    $crate::__private::configure::<$plugin>(config)
                }
            }
            impl exports::cloister::plugin::preprocess::Guest for Export {
                fn process(
                    batch: Vec<$crate::DataRecord>,
                ) -> Result<Vec<$crate::DataRecord>, $crate::PluginError> {
                    $crate::__private::process::<$plugin>(batch)
                }
            }
            export!(Export);
        }
    };
}

/// Export a [`Featurizer`] as the component's plugin. Expands to nothing on
/// non-wasm targets.
#[macro_export]
macro_rules! export_featurizer {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        mod __cloister_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__cloister_generate_featurizer!();
            struct Export;
            impl exports::cloister::plugin::plugin::Guest for Export {
                fn describe() -> $crate::Metadata {
                    $crate::__private::metadata::<$plugin>($crate::PluginKind::Featurizer)
                }
                fn configure(config: Vec<(String, String)>) -> Result<(), $crate::PluginError> {
                    $crate::__private::configure::<$plugin>(config)
                }
            }
            impl exports::cloister::plugin::featurize::Guest for Export {
                fn dimension() -> u32 {
                    $crate::__private::dimension::<$plugin>()
                }
                fn featurize(
                    batch: Vec<$crate::DataRecord>,
                ) -> Result<$crate::SparseBatch, $crate::PluginError> {
                    $crate::__private::featurize::<$plugin>(batch)
                }
            }
            export!(Export);
        }
    };
}

/// Export a [`FittedFeaturizer`] as the component's plugin (the
/// `fitted-featurizer` world). Expands to nothing on non-wasm targets.
#[macro_export]
macro_rules! export_fitted_featurizer {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        mod __cloister_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__cloister_generate_fitted_featurizer!();
            struct Export;
            impl exports::cloister::plugin::plugin::Guest for Export {
                fn describe() -> $crate::Metadata {
                    $crate::__private::metadata::<$plugin>($crate::PluginKind::Featurizer)
                }
                fn configure(config: Vec<(String, String)>) -> Result<(), $crate::PluginError> {
                    $crate::__private::configure::<$plugin>(config)
                }
            }
            impl exports::cloister::plugin::fit::Guest for Export {
                fn terms(item: $crate::DataRecord) -> Result<Vec<u64>, $crate::PluginError> {
                    $crate::__private::terms::<$plugin>(item)
                }
                fn load(vocabulary: $crate::Vocabulary) -> Result<(), $crate::PluginError> {
                    $crate::__private::load::<$plugin>(vocabulary)
                }
            }
            impl exports::cloister::plugin::featurize::Guest for Export {
                fn dimension() -> u32 {
                    $crate::__private::dimension::<$plugin>()
                }
                fn featurize(
                    batch: Vec<$crate::DataRecord>,
                ) -> Result<$crate::SparseBatch, $crate::PluginError> {
                    $crate::__private::featurize::<$plugin>(batch)
                }
            }
            export!(Export);
        }
    };
}

/// Export a [`Selector`] as the component's plugin. Expands to nothing on
/// non-wasm targets.
#[macro_export]
macro_rules! export_selector {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        mod __cloister_export {
            #[allow(unused_imports)]
            use super::*;
            $crate::__cloister_generate_selector!();
            struct Export;
            impl exports::cloister::plugin::plugin::Guest for Export {
                fn describe() -> $crate::Metadata {
                    $crate::__private::metadata::<$plugin>($crate::PluginKind::Selector)
                }
                fn configure(config: Vec<(String, String)>) -> Result<(), $crate::PluginError> {
                    $crate::__private::configure::<$plugin>(config)
                }
            }
            impl exports::cloister::plugin::select::Guest for Export {
                fn select(
                    classes: Vec<String>,
                    batch: Vec<$crate::PredictionSet>,
                ) -> Result<Vec<$crate::Decision>, $crate::PluginError> {
                    $crate::__private::select::<$plugin>(classes, batch)
                }
            }
            export!(Export);
        }
    };
}
