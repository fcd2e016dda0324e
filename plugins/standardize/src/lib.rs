//! `standardize`: a featurizer for numeric fields. Concatenates the configured
//! numeric fields (scalars or vectors) and writes `(x - mean) / std` for every
//! position: a dense row. With `mean` and `std` given, those are the
//! statistics (a position whose `std` is 0 is constant and becomes 0).
//! Without them the values go through as they are, and the training
//! templates standardize dense inputs on the training split themselves
//! (`standardize = auto`): nobody has to compute statistics of data they
//! cannot see.

use cloister_plugin_sdk::{
    Config, ConfigKey, Features, Featurizer, Numeric, Plugin, PluginError, Record,
};

/// The featurizer.
#[derive(Debug, Clone)]
pub struct Standardize {
    fields: Vec<String>,
    /// Positions per record.
    width: usize,
    /// `(mean, std)` per position; empty: the values as they are.
    stats: Vec<(f64, f64)>,
}

impl Plugin for Standardize {
    const NAME: &'static str = "standardize";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Numeric fields as a dense row, z-scored with given statistics or as they are";

    fn config_keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new(
                "fields",
                "pixels",
                "comma-separated numeric fields, concatenated in order; `*`: every numeric \
                 field of the record, in the order of their names (needs `width` or `mean`)",
            ),
            ConfigKey::new(
                "mean",
                "",
                "comma-separated mean per position (none: the values as they are, which the \
                 templates standardize on the training split)",
            ),
            ConfigKey::new(
                "std",
                "",
                "comma-separated standard deviation per position, >= 0 (with mean)",
            ),
            ConfigKey::new(
                "width",
                "",
                "positions per record without mean and std (default: one per field; \
                 needed for vector fields)",
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
        let width: Vec<u32> = config.get_list("width")?;
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
        let every = fields.iter().any(|f| f == "*");
        if every && fields.len() > 1 {
            return Err(PluginError::invalid_config(
                "fields",
                "`*` stands alone: every numeric field",
            ));
        }
        let width = match (width.as_slice(), mean.len()) {
            ([], 0) if every => {
                return Err(PluginError::invalid_config(
                    "width",
                    "is needed with fields `*` (the number of positions)",
                ));
            }
            ([], 0) => fields.len(),
            ([], n) => n,
            ([w], 0) if *w > 0 => *w as usize,
            ([w], n) if n > 0 && *w as usize == n => n,
            ([_], _) => {
                return Err(PluginError::invalid_config(
                    "width",
                    format!(
                        "must be a positive number of positions{}",
                        if mean.is_empty() {
                            String::new()
                        } else {
                            format!(" equal to mean's {}", mean.len())
                        }
                    ),
                ));
            }
            _ => {
                return Err(PluginError::invalid_config("width", "takes one number"));
            }
        };
        Ok(Standardize {
            fields,
            width,
            stats: mean.into_iter().zip(std).collect(),
        })
    }
}

impl Featurizer for Standardize {
    fn dimension(&self) -> u32 {
        self.width as u32
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        let mut pos = 0usize;
        let every = self.fields.first().is_some_and(|f| f == "*");
        let values: Vec<(&str, &Numeric)> = if every {
            // In the order of the names: a CSV's columns and a JSON
            // object's keys reach the plugin in different orders, and the
            // positions must mean the same in training and in `predict`.
            let mut all: Vec<(&str, &Numeric)> = record
                .numerics
                .iter()
                .map(|n| (n.name.as_str(), &n.value))
                .collect();
            all.sort_unstable_by_key(|(name, _)| *name);
            all
        } else {
            let mut v = Vec::with_capacity(self.fields.len());
            for name in &self.fields {
                let Some(value) = record.numeric(name) else {
                    return Err(PluginError::invalid_input(format!(
                        "record {} has no numeric field {name:?}",
                        record.id
                    )));
                };
                v.push((name.as_str(), value));
            }
            v
        };
        for (name, value) in values {
            for &x in value.as_slice() {
                if pos >= self.width {
                    return Err(PluginError::unsupported(format!(
                        "record {} has more than {} numeric values",
                        record.id, self.width
                    )));
                }
                if !x.is_finite() {
                    return Err(PluginError::invalid_input(format!(
                        "record {} field {name:?} holds a non-finite value",
                        record.id
                    )));
                }
                let z = match self.stats.get(pos) {
                    Some(&(m, s)) if s > 0.0 => (x - m) / s,
                    Some(_) => 0.0,
                    None => x,
                };
                let z = z as f32;
                if !z.is_finite() {
                    return Err(PluginError::invalid_input(format!(
                        "record {} field {name:?} holds a value beyond single precision",
                        record.id
                    )));
                }
                out.push(pos as u32, z);
                pos += 1;
            }
        }
        if pos != self.width {
            return Err(PluginError::unsupported(format!(
                "record {} has {pos} numeric values, expected {}",
                record.id, self.width
            )));
        }
        Ok(())
    }
}

cloister_plugin_sdk::export_featurizer!(Standardize);
