//! `least-confidence`: classic uncertainty sampling. Every record goes to
//! human review; the priority is one minus the top probability of the models'
//! mean distribution, so the least confident records come first.

use cloister_plugin_sdk::stats::{argmax, mean_distribution};
use cloister_plugin_sdk::{Action, Config, Plugin, PluginError, PredictionSet, Selector, Verdict};

/// The selector.
#[derive(Debug, Clone, Copy)]
pub struct LeastConfidence;

impl Plugin for LeastConfidence {
    const NAME: &'static str = "least-confidence";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Uncertainty sampling: all to human review, least confident (mean of models) first";

    fn configure(_config: &Config) -> Result<Self, PluginError> {
        Ok(LeastConfidence)
    }
}

impl Selector for LeastConfidence {
    fn select(&mut self, classes: &[String], item: &PredictionSet) -> Result<Verdict, PluginError> {
        let mean = mean_distribution(&item.models)
            .filter(|m| m.len() == classes.len())
            .ok_or_else(|| {
                PluginError::invalid_input(format!("bad distributions for {}", item.id))
            })?;
        let (_, top) = argmax(&mean).ok_or_else(|| {
            PluginError::invalid_input(format!("bad distributions for {}", item.id))
        })?;
        Ok(Verdict {
            action: Action::HumanReview,
            priority: 1.0 - top,
        })
    }
}

cloister_plugin_sdk::export_selector!(LeastConfidence);
