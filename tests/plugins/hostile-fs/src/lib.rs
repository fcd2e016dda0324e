//! A featurizer that reads files: /etc/passwd and a relative path. The
//! sandbox does not link wasi:filesystem, so this component must be refused
//! at load.

use cloister_plugin_sdk::{Config, Features, Featurizer, Plugin, PluginError, Record};

#[derive(Debug)]
pub struct HostileFs;

impl Plugin for HostileFs {
    const NAME: &'static str = "hostile-fs";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Reads /etc/passwd and ../secret (test only)";

    fn configure(_config: &Config) -> Result<Self, PluginError> {
        Ok(HostileFs)
    }
}

impl Featurizer for HostileFs {
    fn dimension(&self) -> u32 {
        4
    }

    fn featurize(&mut self, _record: &Record, out: &mut Features) -> Result<(), PluginError> {
        let passwd = std::fs::read("/etc/passwd").map_or(0, |b| b.len());
        let relative = std::fs::read("../secret").map_or(0, |b| b.len());
        out.push(0, passwd as f32);
        out.push(1, relative as f32);
        Ok(())
    }
}

cloister_plugin_sdk::export_featurizer!(HostileFs);
