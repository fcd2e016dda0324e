//! `hashed-ngrams`: a featurizer for text. Word unigrams and bigrams are
//! hashed with a signed hash into `2^bits` dimensions (collisions cancel in
//! expectation instead of piling up), counts become sublinear
//! (`1 + ln(count)`), and each row is L2-normalised.
//!
//! A token is a maximal run of letters, digits and `_` of at least
//! `min_token_len` characters; ASCII and Unicode letters are lowercased before
//! hashing when `lowercase` is true.

use cloister_plugin_sdk::{Config, ConfigKey, Features, Featurizer, Plugin, PluginError, Record};

const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Hash a token's bytes eight at a time.
#[inline]
fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    fmix64(h)
}

/// The featurizer.
#[derive(Debug, Clone)]
pub struct HashedNgrams {
    field: String,
    bits: u32,
    max_n: u32,
    min_token_len: usize,
    lowercase: bool,
    sublinear_tf: bool,
    l2: bool,
    token: Vec<u8>,
}

impl HashedNgrams {
    #[inline]
    fn emit(&self, h: u64, out: &mut Features) {
        let mask = (1u64 << self.bits) - 1;
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        out.push((h & mask) as u32, sign);
    }

    /// Hash the token currently in `self.token` if it is long enough.
    #[inline]
    fn finish_token(&mut self, chars: usize, prev: &mut Option<u64>, out: &mut Features) {
        if chars >= self.min_token_len {
            let h = hash_bytes(&self.token);
            self.emit(h, out);
            if self.max_n >= 2
                && let Some(p) = *prev
            {
                self.emit(fmix64(p.rotate_left(17) ^ h.wrapping_mul(K)), out);
            }
            *prev = Some(h);
        }
        self.token.clear();
    }

    /// Push the hashed n-grams of `text` into `out` (one row, not closed).
    pub fn featurize_text(&mut self, text: &str, out: &mut Features) {
        let mut prev: Option<u64> = None;
        let mut chars = 0usize;
        for c in text.chars() {
            if c.is_ascii() {
                let b = c as u8;
                if b.is_ascii_alphanumeric() || b == b'_' {
                    self.token.push(if self.lowercase {
                        b.to_ascii_lowercase()
                    } else {
                        b
                    });
                    chars += 1;
                    continue;
                }
            } else if c.is_alphanumeric() {
                let mut buf = [0u8; 4];
                if self.lowercase && c.is_uppercase() {
                    for l in c.to_lowercase() {
                        self.token
                            .extend_from_slice(l.encode_utf8(&mut buf).as_bytes());
                    }
                } else {
                    self.token
                        .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                chars += 1;
                continue;
            }
            if chars > 0 {
                self.finish_token(chars, &mut prev, out);
                chars = 0;
            }
        }
        if chars > 0 {
            self.finish_token(chars, &mut prev, out);
        }
    }
}

impl Plugin for HashedNgrams {
    const NAME: &'static str = "hashed-ngrams";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Signed feature hashing of word unigrams and bigrams with sublinear TF and L2 norm";

    fn config_keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new("field", "text", "the text field to featurize"),
            ConfigKey::new(
                "bits",
                "18",
                "the feature space has 2^bits dimensions (4..=28)",
            ),
            ConfigKey::new(
                "ngrams",
                "2",
                "largest n-gram: 1 (words) or 2 (words and bigrams)",
            ),
            ConfigKey::new(
                "min_token_len",
                "2",
                "shortest token kept, in characters (1..=64)",
            ),
            ConfigKey::new("lowercase", "true", "lowercase tokens before hashing"),
            ConfigKey::new(
                "sublinear_tf",
                "true",
                "use 1 + ln(count) instead of the count",
            ),
            ConfigKey::new(
                "l2_normalize",
                "true",
                "scale each row to unit Euclidean length",
            ),
        ]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        let bits: u32 = config.get("bits")?;
        if !(4..=28).contains(&bits) {
            return Err(PluginError::invalid_config(
                "bits",
                "must be between 4 and 28",
            ));
        }
        let max_n: u32 = config.get("ngrams")?;
        if !(1..=2).contains(&max_n) {
            return Err(PluginError::invalid_config("ngrams", "must be 1 or 2"));
        }
        let min_token_len: usize = config.get("min_token_len")?;
        if !(1..=64).contains(&min_token_len) {
            return Err(PluginError::invalid_config(
                "min_token_len",
                "must be between 1 and 64",
            ));
        }
        let field = config.get_str("field")?.to_string();
        if field.is_empty() {
            return Err(PluginError::invalid_config("field", "must not be empty"));
        }
        Ok(HashedNgrams {
            field,
            bits,
            max_n,
            min_token_len,
            lowercase: config.get_bool("lowercase")?,
            sublinear_tf: config.get_bool("sublinear_tf")?,
            l2: config.get_bool("l2_normalize")?,
            token: Vec::with_capacity(64),
        })
    }
}

impl Featurizer for HashedNgrams {
    fn dimension(&self) -> u32 {
        1u32 << self.bits
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        let Some(text) = record.texts.iter().find(|f| f.name == self.field) else {
            return Err(PluginError::invalid_input(format!(
                "record {} has no text field {:?}",
                record.id, self.field
            )));
        };
        self.featurize_text(&text.value, out);
        Ok(())
    }

    fn finish_row(&self, _indices: &[u32], values: &mut [f32]) {
        if self.sublinear_tf {
            for v in values.iter_mut() {
                if *v != 0.0 {
                    *v = v.signum() * (1.0 + v.abs().ln());
                }
            }
        }
        if self.l2 {
            let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                values.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }
}

cloister_plugin_sdk::export_featurizer!(HashedNgrams);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(pairs: &[(&str, &str)]) -> Result<HashedNgrams, PluginError> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HashedNgrams::configure(&Config::new(&HashedNgrams::config_keys(), pairs)?)
    }

    #[test]
    fn case_folds_and_counts_bigrams() -> Result<(), PluginError> {
        let mut p = plugin(&[("sublinear_tf", "false"), ("l2_normalize", "false")])?;
        let mut a = Features::with_capacity(2, 8);
        p.featurize_text("Free MONEY now", &mut a);
        a.end_row();
        p.featurize_text("free money NOW!", &mut a);
        a.end_row();
        let b = a.into_batch();
        assert_eq!(b.offsets[1] - b.offsets[0], 5, "3 words + 2 bigrams");
        assert_eq!(&b.indices[..5], &b.indices[5..]);
        Ok(())
    }

    #[test]
    fn bad_config_names_key() {
        let e = plugin(&[("bits", "40")]).err();
        assert_eq!(e.and_then(|e| e.key).as_deref(), Some("bits"));
    }
}
