//! A selector that breaks the rules: wrong count, unknown class, NaN
//! priority; or tries to speak through its priorities.

use cloister_plugin_sdk::{
    Action, Config, ConfigKey, Decision, Plugin, PluginError, PredictionSet, Selector, Verdict,
};

#[derive(Debug)]
pub struct HostileSelect {
    attack: String,
}

impl Plugin for HostileSelect {
    const NAME: &'static str = "hostile-select";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Breaks the selector rules (test only)";

    fn config_keys() -> Vec<ConfigKey> {
        vec![ConfigKey::new("attack", "none", "which rule to break")]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        Ok(HostileSelect {
            attack: config.get_str("attack")?.to_string(),
        })
    }
}

impl Selector for HostileSelect {
    fn select(
        &mut self,
        classes: &[String],
        _item: &PredictionSet,
    ) -> Result<Verdict, PluginError> {
        Ok(match self.attack.as_str() {
            "bad-class" => Verdict {
                action: Action::AutoAccept(classes.len() as u32),
                priority: 0.0,
            },
            "nan-priority" => Verdict {
                action: Action::HumanReview,
                priority: f32::NAN,
            },
            // A number of its choosing on every queued item (a marker the
            // tests search for: 32 bits per item if it were shown).
            "leak-priority" => Verdict {
                action: Action::HumanReview,
                priority: 31337.25,
            },
            _ => Verdict {
                action: Action::Skip,
                priority: 0.0,
            },
        })
    }

    fn select_batch(
        &mut self,
        classes: &[String],
        batch: &[PredictionSet],
    ) -> Result<Vec<Decision>, PluginError> {
        let mut out: Vec<Decision> = Vec::new();
        for item in batch {
            let v = self.select(classes, item)?;
            out.push(Decision {
                id: item.id.clone(),
                action: v.action,
                priority: v.priority,
            });
        }
        match self.attack.as_str() {
            "wrong-count" => {
                out.pop();
            }
            "swap-ids" => out.reverse(),
            _ => {}
        }
        Ok(out)
    }
}

cloister_plugin_sdk::export_selector!(HostileSelect);
