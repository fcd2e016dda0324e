//! `entropy`: uncertainty sampling by entropy. Every record goes to human
//! review; the priority is the entropy of the models' mean distribution
//! divided by `ln(classes)`, so it lies in 0..=1 and the most uncertain
//! records come first.

use cloister_plugin_sdk::stats::{entropy, mean_distribution};
use cloister_plugin_sdk::{Action, Config, Plugin, PluginError, PredictionSet, Selector, Verdict};

/// The selector.
#[derive(Debug, Clone, Copy)]
pub struct Entropy;

impl Plugin for Entropy {
    const NAME: &'static str = "entropy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Uncertainty sampling: all to human review, highest normalised entropy first";

    fn configure(_config: &Config) -> Result<Self, PluginError> {
        Ok(Entropy)
    }
}

impl Selector for Entropy {
    fn select(&mut self, classes: &[String], item: &PredictionSet) -> Result<Verdict, PluginError> {
        let mean = mean_distribution(&item.models)
            .filter(|m| m.len() == classes.len() && m.iter().all(|p| p.is_finite()))
            .ok_or_else(|| {
                PluginError::invalid_input(format!("bad distributions for {}", item.id))
            })?;
        let scale = if classes.len() > 1 {
            (classes.len() as f32).ln()
        } else {
            1.0
        };
        Ok(Verdict {
            action: Action::HumanReview,
            priority: entropy(&mean) / scale,
        })
    }
}

cloister_plugin_sdk::export_selector!(Entropy);
