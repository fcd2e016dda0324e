//! A featurizer that tries to carry record bytes, or the host itself, out
//! through what it *says*: the numbers in its output, the key it names in an
//! error, the count it returns, the dimension it declares. The `attack`
//! config key picks the channel (by default `leak-index`, so that `cloister
//! train`, which configures nothing, tries it too); `none` behaves. Every leaking attack puts
//! the first four bytes of the record's `text` into its chosen value, so
//! the tests can search every user-visible output for them.

use cloister_plugin_sdk::{Config, ConfigKey, Features, Featurizer, Plugin, PluginError, Record};

/// How many leading bytes of each record `memorize` encodes.
pub const MEMORIZE_BYTES: u32 = 32;

#[derive(Debug)]
pub struct HostileLeak {
    attack: String,
}

/// The record's first four bytes as a little-endian number.
fn window(record: &Record) -> u32 {
    let text = record.text("text").unwrap_or_default().as_bytes();
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(text) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

impl Plugin for HostileLeak {
    const NAME: &'static str = "hostile-leak";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Tries to leak record bytes through what it says (test only)";

    fn config_keys() -> Vec<ConfigKey> {
        let mut keys = vec![ConfigKey::new(
            "attack",
            "leak-index",
            "which channel to try",
        )];
        for k in 0..16 {
            keys.push(ConfigKey::new(
                &format!("leakkey{k:02}"),
                "",
                "a key named to leak four bits",
            ));
        }
        keys
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        Ok(HostileLeak {
            attack: config.get_str("attack")?.to_string(),
        })
    }
}

impl Featurizer for HostileLeak {
    fn dimension(&self) -> u32 {
        match self.attack.as_str() {
            "huge-dimension" => u32::MAX,
            "big-dimension" => 1 << 24,
            "memorize" => MEMORIZE_BYTES * 256,
            _ => 16,
        }
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        match self.attack.as_str() {
            // An index out of the declared range, chosen by the data.
            "leak-index" => out.push(window(record).max(16), 1.0),
            // Within the rules: one feature per (position, byte) of the
            // text's first bytes, so a model's non-zero weight rows spell
            // out the text of records nothing else shares.
            "memorize" => {
                let text = record.text("text").unwrap_or_default().as_bytes();
                for (pos, &b) in text.iter().take(MEMORIZE_BYTES as usize).enumerate() {
                    out.push(pos as u32 * 256 + u32::from(b), 1.0);
                }
            }
            // An error naming one of its declared keys, chosen by the data.
            "leak-key" => {
                let k = record.text("text").unwrap_or_default().len() % 16;
                return Err(PluginError::invalid_config(
                    &format!("leakkey{k:02}"),
                    "leaking through the key",
                ));
            }
            // A class of errors whose detail carries the bytes.
            "leak-detail" => {
                return Err(PluginError::invalid_input(format!(
                    "bytes {}",
                    window(record)
                )));
            }
            _ => out.push(record.text("text").map_or(0, str::len) as u32 % 16, 1.0),
        }
        Ok(())
    }

    fn featurize_batch(&mut self, batch: &[Record], out: &mut Features) -> Result<(), PluginError> {
        if self.attack == "leak-count" {
            // As many rows as the first record's first byte says.
            let rows = batch.first().map_or(0, |r| window(r) & 0xff) as usize;
            for _ in 0..rows {
                out.end_row();
            }
            return Ok(());
        }
        for record in batch {
            self.featurize(record, out)?;
            out.end_row();
        }
        Ok(())
    }
}

cloister_plugin_sdk::export_featurizer!(HostileLeak);
