//! `standardize`: a featurizer for numeric fields. Concatenates the configured
//! numeric fields (scalars or vectors) and writes `(x - mean) / std` for every
//! position: a dense row. The statistics come from the configuration, computed
//! on the training split by whoever configures the plugin; a position whose
//! `std` is 0 is constant and becomes 0.

use cloister_plugin_sdk::{Config, ConfigKey, Features, Featurizer, Plugin, PluginError, Record};

/// The featurizer.
#[derive(Debug, Clone)]
pub struct Standardize {
    fields: Vec<String>,
    mean: Vec<f64>,
    std: Vec<f64>,
}

impl Plugin for Standardize {
    const NAME: &'static str = "standardize";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Z-score numeric fields with given statistics; dense output";

    fn config_keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new(
                "fields",
                "pixels",
                "comma-separated numeric fields, concatenated in order",
            ),
            ConfigKey::new("mean", "", "comma-separated mean per position (required)"),
            ConfigKey::new(
                "std",
                "",
                "comma-separated standard deviation per position (required, >= 0)",
            ),
        ]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        let fields: Vec<String> = config.get_list("fields")?;
        if fields.is_empty() {
            return Err(PluginError::invalid_config(
                "fields",
                "needs at least one field name",
            ));
        }
        let mean: Vec<f64> = config.get_list("mean")?;
        let std: Vec<f64> = config.get_list("std")?;
        if mean.is_empty() {
            return Err(PluginError::invalid_config("mean", "is required"));
        }
        if mean.iter().any(|m| !m.is_finite()) {
            return Err(PluginError::invalid_config("mean", "values must be finite"));
        }
        if std.len() != mean.len() {
            return Err(PluginError::invalid_config(
                "std",
                format!("has {} values but mean has {}", std.len(), mean.len()),
            ));
        }
        if std.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(PluginError::invalid_config(
                "std",
                "values must be finite and >= 0",
            ));
        }
        if mean.len() > u32::MAX as usize {
            return Err(PluginError::invalid_config("mean", "too many values"));
        }
        Ok(Standardize { fields, mean, std })
    }
}

impl Featurizer for Standardize {
    fn dimension(&self) -> u32 {
        self.mean.len() as u32
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        let mut pos = 0usize;
        for name in &self.fields {
            let Some(value) = record.numeric(name) else {
                return Err(PluginError::invalid_input(format!(
                    "record {} has no numeric field {name:?}",
                    record.id
                )));
            };
            for &x in value.as_slice() {
                let (Some(&m), Some(&s)) = (self.mean.get(pos), self.std.get(pos)) else {
                    return Err(PluginError::unsupported(format!(
                        "record {} has more than {} numeric values",
                        record.id,
                        self.mean.len()
                    )));
                };
                if !x.is_finite() {
                    return Err(PluginError::invalid_input(format!(
                        "record {} field {name:?} holds a non-finite value",
                        record.id
                    )));
                }
                let z = if s > 0.0 { (x - m) / s } else { 0.0 };
                out.push(pos as u32, z as f32);
                pos += 1;
            }
        }
        if pos != self.mean.len() {
            return Err(PluginError::unsupported(format!(
                "record {} has {pos} numeric values, expected {}",
                record.id,
                self.mean.len()
            )));
        }
        Ok(())
    }
}

cloister_plugin_sdk::export_featurizer!(Standardize);
