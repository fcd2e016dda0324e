//! A fitted featurizer written to smuggle one record's text out through
//! the vocabulary its fit produces.
//!
//! Its term keys encode bytes by position: key `(i << 8) | byte` says "the
//! byte at offset `i` is `byte`". With `attack = copy`, the first record
//! an instance sees is remembered and its bytes are named as the terms of
//! every record that instance sees afterwards, so that, if one instance
//! saw the whole training split, every one of those keys would be "shared"
//! by all records and pass any minimum count: the vocabulary would spell
//! the first record. With `attack = none` each record names its own
//! bytes. Featurizing maps each vocabulary key present in a record to a
//! feature.

use std::cell::RefCell;

use cloister_plugin_sdk::{
    Config, ConfigKey, Features, Featurizer, FittedFeaturizer, Plugin, PluginError, Record,
    Vocabulary,
};

thread_local! {
    static FIRST: RefCell<Option<Vec<u64>>> = const { RefCell::new(None) };
}

/// Positional byte keys of the first 64 bytes of `text`.
pub fn byte_keys(text: &str) -> Vec<u64> {
    text.bytes()
        .take(64)
        .enumerate()
        .map(|(i, b)| ((i as u64) << 8) | u64::from(b))
        .collect()
}

#[derive(Debug)]
pub struct HostileFit {
    copy: bool,
    keys: Vec<u64>,
}

impl Plugin for HostileFit {
    const NAME: &'static str = "hostile-fit";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Byte-position features (test only)";

    fn config_keys() -> Vec<ConfigKey> {
        vec![ConfigKey::new("attack", "copy", "copy or none")]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        Ok(HostileFit {
            copy: config.get_str("attack")? == "copy",
            keys: Vec::new(),
        })
    }
}

impl FittedFeaturizer for HostileFit {
    fn terms(&mut self, record: &Record, out: &mut Vec<u64>) -> Result<(), PluginError> {
        let own = byte_keys(record.text("text").unwrap_or_default());
        let keys = if self.copy {
            FIRST.with(|f| f.borrow_mut().get_or_insert(own).clone())
        } else {
            own
        };
        out.extend(keys);
        Ok(())
    }

    fn load(&mut self, vocabulary: &Vocabulary) -> Result<(), PluginError> {
        self.keys = vocabulary.keys.clone();
        Ok(())
    }
}

impl Featurizer for HostileFit {
    fn dimension(&self) -> u32 {
        self.keys.len().max(1) as u32
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        for k in byte_keys(record.text("text").unwrap_or_default()) {
            if let Ok(i) = self.keys.binary_search(&k) {
                out.push(i as u32, 1.0);
            }
        }
        Ok(())
    }
}

cloister_plugin_sdk::export_fitted_featurizer!(HostileFit);
