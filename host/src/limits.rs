//! Resource limits an administrator sets for one environment, in the
//! optional file `limits.toml` at the environment's root (`cloister init`
//! writes one with the defaults). Values a plugin declares are held to
//! these before the host allocates anything sized by them.
//!
//! ```toml
//! [plugins]
//! max_feature_dimension = 16777216   # largest dimension a featurizer may declare
//! artifact_cache_mb = 1024           # compiled plugins kept on disk (0: none)
//!
//! [training]
//! memory_budget_mb = 4096            # refuse training whose model state would need more
//! feature_cache_mb = 2048            # features kept for reuse (0: no cache)
//!
//! [disclosure]
//! min_records = 10                   # k: records behind every released weight and count
//! max_membership_auc = 0.65          # membership-inference limits (SACRO-ML's defaults)
//! max_significant_share = 0.10
//! max_tpr_at_low_fpr = 0.01
//! repetitions = 20
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
# Plugins compiled to machine code are kept in cache/ so the next process
# loads them in well under a millisecond; the ones used least recently go
# when the directory is larger than this many MiB (0 to 1048576; 0 keeps
# none, and every process compiles each plugin it runs again).
artifact_cache_mb = 1024

[training]
# Training is refused before it starts when the model's state (weights,
# optimizer moments, gradients, the best-epoch copy) would need more than
# this many MiB.
memory_budget_mb = 4096
# Features of a dataset version run through a plugin chain are kept in
# feature-cache/ so the next train, job or resume on the same inputs skips
# the plugins; the oldest entries go when the cache is larger than this
# many MiB (0 to 1048576; 0 turns the cache off).
feature_cache_mb = 2048

[disclosure]
# The checks every trained model gets before it may be released
# (docs/disclosure.md). Input weights and released counts need at least
# `min_records` training records behind them (2 to 1000000). A
# loss-threshold membership attack is flagged when its mean AUC is above
# `max_membership_auc` (0.5 to 1) or it is significant at 0.05 in more
# than `max_significant_share` (0 to 1) of `repetitions` (1 to 1000)
# samples; a flagged attack fails the model when it finds members at
# FPR <= 1e-3 at a rate above `max_tpr_at_low_fpr` (0 to 1) and three
# times chance.
min_records = 10
max_membership_auc = 0.65
max_significant_share = 0.10
max_tpr_at_low_fpr = 0.01
repetitions = 20
";

/// The limits of an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EnvLimits {
    /// Limits on plugins.
    #[serde(default)]
    pub plugins: PluginLimits,
    /// Limits on training.
    #[serde(default)]
    pub training: TrainingLimits,
    /// Thresholds of the disclosure check.
    #[serde(default)]
    pub disclosure: DisclosureLimits,
}

/// `[disclosure]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisclosureLimits {
    /// k: training records behind every released weight and count.
    #[serde(default = "default_k")]
    pub min_records: u32,
    /// Mean membership-inference AUC above which a model fails.
    #[serde(default = "default_auc")]
    pub max_membership_auc: f64,
    /// Share of significant attack repetitions above which the attack is
    /// flagged (it fails the model together with `max_tpr_at_low_fpr`).
    #[serde(default = "default_share")]
    pub max_significant_share: f64,
    /// True-positive rate at FPR <= 1e-3 above which a significant attack
    /// fails the model.
    #[serde(default = "default_tpr")]
    pub max_tpr_at_low_fpr: f64,
    /// Repetitions of the attack.
    #[serde(default = "default_repetitions")]
    pub repetitions: u32,
}

fn default_k() -> u32 {
    crate::train::disclosure::Thresholds::default().k
}
fn default_auc() -> f64 {
    crate::train::disclosure::Thresholds::default().max_auc
}
fn default_share() -> f64 {
    crate::train::disclosure::Thresholds::default().max_significant_share
}
fn default_tpr() -> f64 {
    crate::train::disclosure::Thresholds::default().max_tpr_at_low_fpr
}
fn default_repetitions() -> u32 {
    crate::train::disclosure::Thresholds::default().repetitions
}

impl Default for DisclosureLimits {
    fn default() -> Self {
        DisclosureLimits {
            min_records: default_k(),
            max_membership_auc: default_auc(),
            max_significant_share: default_share(),
            max_tpr_at_low_fpr: default_tpr(),
            repetitions: default_repetitions(),
        }
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Largest feature dimension a featurizer may declare.
    #[serde(default = "default_dimension")]
    pub max_feature_dimension: u32,
    /// Size of the compiled-plugin cache on disk, in MiB (0: none).
    #[serde(default = "default_artifact_cache_mb")]
    pub artifact_cache_mb: u64,
}

fn default_artifact_cache_mb() -> u64 {
    1024
}

/// `[training]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingLimits {
    /// Memory budget of one model's training state, in MiB.
    #[serde(default = "default_training_mb")]
    pub memory_budget_mb: u64,
    /// Size of the feature cache, in MiB (0: off).
    #[serde(default = "default_feature_cache_mb")]
    pub feature_cache_mb: u64,
}

fn default_feature_cache_mb() -> u64 {
    2048
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
            artifact_cache_mb: default_artifact_cache_mb(),
        }
    }
}

impl Default for TrainingLimits {
    fn default() -> Self {
        TrainingLimits {
            memory_budget_mb: DEFAULT_TRAINING_MEMORY_MB,
            feature_cache_mb: default_feature_cache_mb(),
        }
    }
}

impl EnvLimits {
    /// Parses `limits.toml`; the error names the line, column and field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let limits: EnvLimits = toml::from_str(text)
            .map_err(|e| cloister_types::toml_problem::TomlProblem::of(text, &e).to_string())?;
        let dim = limits.plugins.max_feature_dimension;
        if dim == 0 || dim > 1 << 31 {
            return Err(format!(
                "[plugins] max_feature_dimension = {dim}: must be between 1 and 2147483648"
            ));
        }
        let artifacts = limits.plugins.artifact_cache_mb;
        if artifacts > 1 << 20 {
            return Err(format!(
                "[plugins] artifact_cache_mb = {artifacts}: must be between 0 and 1048576"
            ));
        }
        let mb = limits.training.memory_budget_mb;
        if mb == 0 || mb > 1 << 30 {
            return Err(format!(
                "[training] memory_budget_mb = {mb}: must be between 1 and 1073741824"
            ));
        }
        let cache = limits.training.feature_cache_mb;
        if cache > 1 << 20 {
            return Err(format!(
                "[training] feature_cache_mb = {cache}: must be between 0 and 1048576"
            ));
        }
        let d = &limits.disclosure;
        if !(2..=1_000_000).contains(&d.min_records) {
            return Err(format!(
                "[disclosure] min_records = {}: must be between 2 and 1000000",
                d.min_records
            ));
        }
        if !(0.5..=1.0).contains(&d.max_membership_auc) {
            return Err(format!(
                "[disclosure] max_membership_auc = {}: must be between 0.5 and 1",
                d.max_membership_auc
            ));
        }
        if !(0.0..=1.0).contains(&d.max_significant_share) {
            return Err(format!(
                "[disclosure] max_significant_share = {}: must be between 0 and 1",
                d.max_significant_share
            ));
        }
        if !(0.0..=1.0).contains(&d.max_tpr_at_low_fpr) {
            return Err(format!(
                "[disclosure] max_tpr_at_low_fpr = {}: must be between 0 and 1",
                d.max_tpr_at_low_fpr
            ));
        }
        if !(1..=1000).contains(&d.repetitions) {
            return Err(format!(
                "[disclosure] repetitions = {}: must be between 1 and 1000",
                d.repetitions
            ));
        }
        Ok(limits)
    }

    /// The thresholds of the disclosure check.
    pub fn disclosure(&self) -> crate::train::disclosure::Thresholds {
        crate::train::disclosure::Thresholds {
            k: self.disclosure.min_records,
            max_auc: self.disclosure.max_membership_auc,
            max_significant_share: self.disclosure.max_significant_share,
            max_tpr_at_low_fpr: self.disclosure.max_tpr_at_low_fpr,
            repetitions: self.disclosure.repetitions,
        }
    }

    /// The plugin call limits of this environment: the runtime's defaults
    /// with the administrator's caps.
    pub fn plugin_call_limits(&self) -> crate::runtime::Limits {
        crate::runtime::Limits {
            max_dimension: self.plugins.max_feature_dimension,
            ..crate::runtime::Limits::default()
        }
    }

    /// The compiled-plugin cache's size on disk in bytes (0: none).
    pub fn artifact_cache_bytes(&self) -> u64 {
        self.plugins.artifact_cache_mb.saturating_mul(1024 * 1024)
    }

    /// The feature cache's size in bytes (0: off).
    pub fn feature_cache_bytes(&self) -> u64 {
        self.training.feature_cache_mb.saturating_mul(1024 * 1024)
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
        let e = EnvLimits::parse("[disclosure]\nmin_records = 1\n").unwrap_err();
        assert!(e.contains("min_records"), "{e}");
        let e = EnvLimits::parse("[disclosure]\nmax_membership_auc = 0.2\n").unwrap_err();
        assert!(e.contains("max_membership_auc"), "{e}");
    }
}
