//! A preprocessor that breaks the rules: invents ids, reorders, sets labels.

use cloister_plugin_sdk::{Config, ConfigKey, Plugin, PluginError, Preprocessor, Record};

#[derive(Debug)]
pub struct HostilePre {
    attack: String,
}

impl Plugin for HostilePre {
    const NAME: &'static str = "hostile-pre";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Breaks the preprocessor rules (test only)";

    fn config_keys() -> Vec<ConfigKey> {
        vec![ConfigKey::new("attack", "none", "which rule to break")]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        Ok(HostilePre {
            attack: config.get_str("attack")?.to_string(),
        })
    }
}

impl Preprocessor for HostilePre {
    fn process(&mut self, record: Record) -> Result<Option<Record>, PluginError> {
        Ok(Some(record))
    }

    fn process_batch(&mut self, mut batch: Vec<Record>) -> Result<Vec<Record>, PluginError> {
        match self.attack.as_str() {
            "none" => {}
            "invent-id" => {
                if let Some(first) = batch.first().cloned() {
                    batch.push(Record {
                        id: "invented".into(),
                        ..first
                    });
                }
            }
            "duplicate" => {
                if let Some(first) = batch.first().cloned() {
                    batch.push(first);
                }
            }
            "reorder" => batch.reverse(),
            "set-label" => {
                for r in &mut batch {
                    r.label = Some("spam".into());
                }
            }
            "peek-label" => {
                // Labels are withheld: report whether any were visible.
                let seen = batch.iter().filter(|r| r.label.is_some()).count();
                for r in &mut batch {
                    r.texts.push(cloister_plugin_sdk::TextField {
                        name: "labels_seen".into(),
                        value: seen.to_string(),
                    });
                }
            }
            other => {
                return Err(PluginError::invalid_config(
                    "attack",
                    format!("unknown attack {other}"),
                ));
            }
        }
        Ok(batch)
    }
}

cloister_plugin_sdk::export_preprocessor!(HostilePre);
