//! Resource limits an administrator sets for one environment, in the
//! optional file `limits.toml` at the environment's root (`cloister init`
//! writes one with the defaults). Values a plugin declares are held to
//! these before the host allocates anything sized by them.
//!
//! ```toml
//! [plugins]
//! max_feature_dimension = 16777216   # largest dimension a featurizer may declare
//!
//! [training]
//! memory_budget_mb = 4096            # refuse training whose model state would need more
//! ```

use serde::{Deserialize, Serialize};

use crate::runtime::DEFAULT_MAX_DIMENSION;

/// The file name, at the environment's root.
pub const LIMITS_FILE: &str = "limits.toml";

/// The default training memory budget, in MiB.
pub const DEFAULT_TRAINING_MEMORY_MB: u64 = 4096;

/// What `cloister init` writes.
pub const DEFAULT_LIMITS_TOML: &str = "\
# Resource limits of this environment. Edit as an administrator; every
# process that opens the environment reads this file at start.

[plugins]
# Largest feature dimension a featurizer may declare (1 to 2147483648).
# Checked when a featurizer is configured, before anything is allocated.
max_feature_dimension = 16777216

[training]
# Training is refused before it starts when the model's state (weights,
# optimizer moments, gradients, the best-epoch copy) would need more than
# this many MiB.
memory_budget_mb = 4096
";

/// The limits of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EnvLimits {
    /// Limits on plugins.
    #[serde(default)]
    pub plugins: PluginLimits,
    /// Limits on training.
    #[serde(default)]
    pub training: TrainingLimits,
}

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Largest feature dimension a featurizer may declare.
    #[serde(default = "default_dimension")]
    pub max_feature_dimension: u32,
}

/// `[training]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingLimits {
    /// Memory budget of one model's training state, in MiB.
    #[serde(default = "default_training_mb")]
    pub memory_budget_mb: u64,
}

fn default_dimension() -> u32 {
    DEFAULT_MAX_DIMENSION
}

fn default_training_mb() -> u64 {
    DEFAULT_TRAINING_MEMORY_MB
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            max_feature_dimension: DEFAULT_MAX_DIMENSION,
        }
    }
}

impl Default for TrainingLimits {
    fn default() -> Self {
        TrainingLimits {
            memory_budget_mb: DEFAULT_TRAINING_MEMORY_MB,
        }
    }
}

impl EnvLimits {
    /// Parses `limits.toml`; the error names the line, column and field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let limits: EnvLimits = toml::from_str(text).map_err(|e| e.to_string())?;
        let dim = limits.plugins.max_feature_dimension;
        if dim == 0 || dim > 1 << 31 {
            return Err(format!(
                "[plugins] max_feature_dimension = {dim}: must be between 1 and 2147483648"
            ));
        }
        let mb = limits.training.memory_budget_mb;
        if mb == 0 || mb > 1 << 30 {
            return Err(format!(
                "[training] memory_budget_mb = {mb}: must be between 1 and 1073741824"
            ));
        }
        Ok(limits)
    }

    /// The plugin call limits of this environment: the runtime's defaults
    /// with the administrator's caps.
    pub fn plugin_call_limits(&self) -> crate::runtime::Limits {
        crate::runtime::Limits {
            max_dimension: self.plugins.max_feature_dimension,
            ..crate::runtime::Limits::default()
        }
    }

    /// The training memory budget in bytes.
    pub fn training_budget_bytes(&self) -> u64 {
        self.training.memory_budget_mb.saturating_mul(1024 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        assert_eq!(
            EnvLimits::parse(DEFAULT_LIMITS_TOML),
            Ok(EnvLimits::default())
        );
        assert_eq!(EnvLimits::parse(""), Ok(EnvLimits::default()));
    }

    #[test]
    fn bad_files_name_the_line_and_field() {
        let e = EnvLimits::parse("[plugins]\nmax_feature_dimensions = 3\n").unwrap_err();
        assert!(
            e.contains("line 2") && e.contains("max_feature_dimensions"),
            "{e}"
        );
        let e = EnvLimits::parse("[training]\nmemory_budget_mb = \"lots\"\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = EnvLimits::parse("[plugins]\nmax_feature_dimension = 0\n").unwrap_err();
        assert!(e.contains("max_feature_dimension"), "{e}");
        let e = EnvLimits::parse("[plugins]\nmax_feature_dimension = 99999999999\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }
}
