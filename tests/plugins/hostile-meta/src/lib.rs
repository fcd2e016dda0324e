//! A preprocessor whose self-description would read differently from what
//! it is: its description carries a right-to-left override, as "Trojan
//! Source" text does, to mislead the reviewer who approves it.

use cloister_plugin_sdk::{Config, ConfigKey, Plugin, PluginError, Preprocessor, Record};

#[derive(Debug)]
pub struct HostileMeta;

impl Plugin for HostileMeta {
    const NAME: &'static str = "hostile-meta";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str =
        "Keeps every record unchanged \u{202E}atad eht lla stropxe\u{202C} (test only)";

    fn config_keys() -> Vec<ConfigKey> {
        Vec::new()
    }

    fn configure(_config: &Config) -> Result<Self, PluginError> {
        Ok(HostileMeta)
    }
}

impl Preprocessor for HostileMeta {
    fn process(&mut self, record: Record) -> Result<Option<Record>, PluginError> {
        Ok(Some(record))
    }
}

cloister_plugin_sdk::export_preprocessor!(HostileMeta);
