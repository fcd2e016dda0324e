//! `dual-agree`: the auto-labeling rule of Cloister's active-learning loop.
//! When every model predicts the same class and every model's probability for
//! it is at least `threshold`, the label is accepted automatically; otherwise
//! the record goes to human review with a priority that grows with the
//! models' disagreement (number of distinct predicted classes) and their
//! uncertainty: with `rank = "confidence"` (the default) one minus the mean
//! top probability, with `rank = "margin"` one minus the gap between the two
//! most likely classes of the models' mean distribution (which on many-class
//! data tells a two-way confusion from a flat, uninformative distribution).

use cloister_plugin_sdk::stats::{argmax, mean_distribution};
use cloister_plugin_sdk::{
    Action, Config, ConfigKey, Plugin, PluginError, PredictionSet, Selector, Verdict,
};

/// The selector.
#[derive(Debug, Clone)]
pub struct DualAgree {
    threshold: f32,
    min_models: usize,
    rank: Rank,
}

/// How uncertainty is measured for records sent to humans.
#[derive(Debug, Clone, Copy)]
enum Rank {
    /// One minus the mean of each model's top probability.
    Confidence,
    /// One minus the margin between the top two classes of the mean
    /// distribution.
    Margin,
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
            ConfigKey::new(
                "rank",
                "confidence",
                "uncertainty for human review: `confidence` (1 - mean top probability) or `margin` (1 - gap between the top two classes of the mean distribution)",
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
        let rank = match config.get_str("rank")?.trim() {
            "confidence" => Rank::Confidence,
            "margin" => Rank::Margin,
            _ => {
                return Err(PluginError::invalid_config(
                    "rank",
                    "must be `confidence` or `margin`",
                ));
            }
        };
        Ok(DualAgree {
            threshold,
            min_models,
            rank,
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
        let uncertainty = match self.rank {
            Rank::Confidence => 1.0 - tops.iter().map(|&(_, p)| p).sum::<f32>() / tops.len() as f32,
            Rank::Margin => {
                let mean = mean_distribution(&item.models).ok_or_else(|| {
                    PluginError::invalid_input(format!("bad distributions for {}", item.id))
                })?;
                1.0 - top_two_margin(&mean)
            }
        };
        Ok(Verdict {
            action: Action::HumanReview,
            priority: (distinct.len() - 1) as f32 + uncertainty,
        })
    }
}

/// The gap between the largest and the second largest probability (the
/// largest itself when there is one class).
fn top_two_margin(p: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, 0.0f32);
    for &v in p {
        if v > first {
            second = first.max(0.0);
            first = v;
        } else if v > second {
            second = v;
        }
    }
    first - second
}

cloister_plugin_sdk::export_selector!(DualAgree);

#[cfg(test)]
mod tests {
    use super::top_two_margin;

    /// The plugin as the host runs it: agreement above the threshold is
    /// accepted, the rest goes to people, the least certain first.
    #[test]
    fn agreement_above_the_threshold_is_accepted_and_the_rest_ranked() {
        use cloister_plugin_sdk::{Action, PredictionSet, testing};
        let mut p: super::DualAgree = testing::configure(&[("threshold", "0.9")]).unwrap();
        let items = [
            PredictionSet::new("sure", vec![vec![0.95, 0.05], vec![0.92, 0.08]]),
            PredictionSet::new("unsure", vec![vec![0.6, 0.4], vec![0.7, 0.3]]),
            PredictionSet::new("split", vec![vec![0.9, 0.1], vec![0.1, 0.9]]),
        ];
        let d = testing::select(&mut p, &["ham", "spam"], &items).unwrap();
        assert_eq!(d[0].action, Action::AutoAccept(0));
        assert_eq!(
            (d[1].action, d[2].action),
            (Action::HumanReview, Action::HumanReview)
        );
        assert!(
            d[2].priority > d[1].priority,
            "disagreement is reviewed first"
        );
        // One model is not enough: the plugin's own error.
        let one = [PredictionSet::new("x", vec![vec![1.0, 0.0]])];
        assert!(matches!(
            testing::select(&mut p, &["ham", "spam"], &one),
            Err(testing::Refused::Plugin(_))
        ));
    }

    #[test]
    fn margin_between_the_two_most_likely_classes() {
        assert!((top_two_margin(&[0.05, 0.5, 0.45]) - 0.05).abs() < 1e-6);
        assert!((top_two_margin(&[0.45, 0.05, 0.5]) - 0.05).abs() < 1e-6);
        assert_eq!(top_two_margin(&[0.5, 0.5]), 0.0);
        assert_eq!(top_two_margin(&[1.0]), 1.0);
        assert_eq!(top_two_margin(&[0.0, 0.0, 1.0]), 1.0);
    }
}
