//! `dual-agree`: the auto-labeling rule of Cloister's active-learning loop.
//! When every model predicts the same class and every model's probability for
//! it is at least `threshold`, the label is accepted automatically; otherwise
//! the record goes to human review with a priority that grows with the
//! models' disagreement (number of distinct predicted classes) and their
//! uncertainty (one minus the mean top probability).

use cloister_plugin_sdk::stats::argmax;
use cloister_plugin_sdk::{
    Action, Config, ConfigKey, Plugin, PluginError, PredictionSet, Selector, Verdict,
};

/// The selector.
#[derive(Debug, Clone)]
pub struct DualAgree {
    threshold: f32,
    min_models: usize,
}

impl Plugin for DualAgree {
    const NAME: &'static str = "dual-agree";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Auto-accept where all models agree with confidence >= threshold; others to humans";

    fn config_keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new(
                "threshold",
                "0.95",
                "minimum probability every model must give the agreed class (0.5..=1)",
            ),
            ConfigKey::new(
                "min_models",
                "2",
                "fewest models a prediction set must hold (>= 2)",
            ),
        ]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        let threshold: f32 = config.get("threshold")?;
        if !(0.5..=1.0).contains(&threshold) {
            return Err(PluginError::invalid_config(
                "threshold",
                "must be between 0.5 and 1",
            ));
        }
        let min_models: usize = config.get("min_models")?;
        if min_models < 2 {
            return Err(PluginError::invalid_config(
                "min_models",
                "must be at least 2",
            ));
        }
        Ok(DualAgree {
            threshold,
            min_models,
        })
    }
}

impl Selector for DualAgree {
    fn select(&mut self, classes: &[String], item: &PredictionSet) -> Result<Verdict, PluginError> {
        if item.models.len() < self.min_models {
            return Err(PluginError::invalid_input(format!(
                "{} models for {}, need at least {}",
                item.models.len(),
                item.id,
                self.min_models
            )));
        }
        let mut tops = Vec::with_capacity(item.models.len());
        for dist in &item.models {
            if dist.len() != classes.len() {
                return Err(PluginError::invalid_input(format!(
                    "a distribution for {} has {} entries for {} classes",
                    item.id,
                    dist.len(),
                    classes.len()
                )));
            }
            let Some(top) = argmax(dist) else {
                return Err(PluginError::invalid_input(format!(
                    "bad distribution for {}",
                    item.id
                )));
            };
            tops.push(top);
        }
        let first = tops[0].0;
        let agree = tops.iter().all(|&(c, _)| c == first);
        let confident = tops.iter().all(|&(_, p)| p >= self.threshold);
        if agree && confident {
            return Ok(Verdict {
                action: Action::AutoAccept(first as u32),
                priority: 0.0,
            });
        }
        let mut distinct: Vec<usize> = tops.iter().map(|&(c, _)| c).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mean_top = tops.iter().map(|&(_, p)| p).sum::<f32>() / tops.len() as f32;
        Ok(Verdict {
            action: Action::HumanReview,
            priority: (distinct.len() - 1) as f32 + (1.0 - mean_top),
        })
    }
}

cloister_plugin_sdk::export_selector!(DualAgree);
