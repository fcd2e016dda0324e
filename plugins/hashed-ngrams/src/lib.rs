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
    hash_words(bytes, |w| w)
}

/// Eight bytes with the high bit set in each.
const HIGH: u64 = 0x8080_8080_8080_8080;
/// Eight bytes of value one.
const ONES: u64 = 0x0101_0101_0101_0101;

/// Lowercase the ASCII capitals among eight bytes that are all below 0x80
/// (SWAR: every byte at once, no carry between bytes).
#[inline]
fn lower_ascii_word(w: u64) -> u64 {
    // For a byte x < 0x80, ((x | 0x80) - c) keeps its high bit iff x >= c,
    // and never borrows from the next byte.
    let at_least_a = (w | HIGH).wrapping_sub(ONES * u64::from(b'A')) & HIGH;
    let above_z = (w | HIGH).wrapping_sub(ONES * u64::from(b'Z' + 1)) & HIGH;
    let upper = at_least_a & !above_z;
    // 0x80 >> 2 == 0x20, the ASCII case bit.
    w | (upper >> 2)
}

/// The hash of `hash_bytes`, with every 8-byte word passed through `map`
/// first (which must map the zero padding of the last word to zero).
#[inline]
fn hash_words(bytes: &[u8], map: impl Fn(u64) -> u64) -> u64 {
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(23) ^ map(u64::from_le_bytes(w))).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(23) ^ map(u64::from_le_bytes(w))).wrapping_mul(K);
    }
    fmix64(h)
}

/// What a byte of UTF-8 text is to the tokenizer.
const SEPARATOR: u8 = 0;
/// `[0-9A-Za-z_]`: part of a token.
const WORD: u8 = 1;
/// A byte of a multi-byte character: decode it to decide.
const NON_ASCII: u8 = 2;

/// The class of every byte value.
const CLASS: [u8; 256] = {
    let mut t = [SEPARATOR; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = if c >= 0x80 {
            NON_ASCII
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            WORD
        } else {
            SEPARATOR
        };
        b += 1;
    }
    t
};

/// The high bit of each of the eight bytes of `w` that is `[0-9A-Za-z_]`.
#[inline]
fn word_mask(w: u64) -> u64 {
    // Every byte of `x` is at least 0x80 and every `c` below it, so the
    // subtraction never borrows across bytes; the high bit survives iff the
    // byte's low seven bits are at least `c`.
    let x = w | HIGH;
    let ge = |c: u8| x.wrapping_sub(ONES * u64::from(c)) & HIGH;
    let digit = ge(b'0') & !ge(b'9' + 1);
    let upper = ge(b'A') & !ge(b'Z' + 1);
    let lower = ge(b'a') & !ge(b'z' + 1);
    let underscore = ge(b'_') & !ge(b'_' + 1);
    // Bytes with the high bit set belong to multi-byte characters.
    (digit | upper | lower | underscore) & !w
}

/// Eight bytes of `bytes` from `i`, little-endian, if there are eight.
#[inline]
fn word_at(bytes: &[u8], i: usize) -> Option<u64> {
    let w: [u8; 8] = bytes.get(i..i.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// The first index from `i` on whose byte is not an ASCII separator (a
/// token byte or part of a multi-byte character), or `bytes.len()`.
#[inline]
fn skip_separators(bytes: &[u8], mut i: usize) -> usize {
    while let Some(w) = word_at(bytes, i) {
        let stop = word_mask(w) | (w & HIGH);
        if stop != 0 {
            return i + (stop.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && CLASS[usize::from(bytes[i])] == SEPARATOR {
        i += 1;
    }
    i
}

/// The first index from `i` on whose byte is not `[0-9A-Za-z_]`, or
/// `bytes.len()`.
#[inline]
fn word_end(bytes: &[u8], mut i: usize) -> usize {
    while let Some(w) = word_at(bytes, i) {
        let stop = !word_mask(w) & HIGH;
        if stop != 0 {
            return i + (stop.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && CLASS[usize::from(bytes[i])] == WORD {
        i += 1;
    }
    i
}

/// Sublinear term frequencies `1 + ln(k)` for the small counts that almost
/// every feature has, computed with the same `ln` as the general case so
/// the results are bit-identical.
const TF_TABLE: usize = 64;

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
    /// `1 + ln(k)` for `k` in `0..TF_TABLE` (entry 0 unused).
    tf: [f32; TF_TABLE],
}

impl HashedNgrams {
    #[inline]
    fn emit(&self, h: u64, out: &mut Features) {
        let mask = (1u64 << self.bits) - 1;
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        out.push((h & mask) as u32, sign);
    }

    /// Emit a finished token's unigram (and bigram with the previous
    /// token) if it has at least `min_token_len` characters.
    #[inline]
    fn finish_hash(&self, h: u64, chars: usize, prev: &mut Option<u64>, out: &mut Features) {
        if chars >= self.min_token_len {
            self.emit(h, out);
            if self.max_n >= 2
                && let Some(p) = *prev
            {
                self.emit(fmix64(p.rotate_left(17) ^ h.wrapping_mul(K)), out);
            }
            *prev = Some(h);
        }
    }

    /// Push the hashed n-grams of `text` into `out` (one row, not closed).
    ///
    /// Tokens of ASCII letters, digits and `_` (almost all of them) are
    /// found with a byte table and hashed straight from the text, eight
    /// bytes at a time and lowercased eight at a time; a token that meets a
    /// multi-byte character is finished character by character.
    pub fn featurize_text(&mut self, text: &str, out: &mut Features) {
        let bytes = text.as_bytes();
        let n = bytes.len();
        let mut prev: Option<u64> = None;
        let mut i = 0;
        loop {
            i = skip_separators(bytes, i);
            let Some(&b) = bytes.get(i) else { break };
            if b < 0x80 {
                let start = i;
                i = word_end(bytes, i);
                if i < n
                    && CLASS[usize::from(bytes[i])] == NON_ASCII
                    && text
                        .get(i..)
                        .and_then(|t| t.chars().next())
                        .is_some_and(char::is_alphanumeric)
                {
                    i = self.slow_token(text, start, &mut prev, out);
                } else {
                    let word = &bytes[start..i];
                    let h = if self.lowercase {
                        hash_words(word, lower_ascii_word)
                    } else {
                        hash_bytes(word)
                    };
                    self.finish_hash(h, i - start, &mut prev, out);
                }
            } else {
                match text.get(i..).and_then(|t| t.chars().next()) {
                    Some(c) if c.is_alphanumeric() => {
                        i = self.slow_token(text, i, &mut prev, out);
                    }
                    Some(c) => i += c.len_utf8(),
                    // Not at a character boundary: cannot happen in a
                    // `str`, but never loop forever.
                    None => i += 1,
                }
            }
        }
    }

    /// Finish the token that starts at byte `start` character by character
    /// (it contains a multi-byte character); returns the byte after it.
    fn slow_token(
        &mut self,
        text: &str,
        start: usize,
        prev: &mut Option<u64>,
        out: &mut Features,
    ) -> usize {
        self.token.clear();
        let mut chars = 0usize;
        let mut end = text.len();
        let rest = text.get(start..).unwrap_or("");
        for (at, c) in rest.char_indices() {
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
            end = start + at;
            break;
        }
        let h = hash_bytes(&self.token);
        self.finish_hash(h, chars, prev, out);
        end
    }

    /// `1 + ln(|v|)` with `v`'s sign.
    #[inline]
    fn sublinear(&self, v: f32) -> f32 {
        let a = v.abs();
        let k = a as usize;
        let l = if k < TF_TABLE && k as f32 == a {
            self.tf[k]
        } else {
            1.0 + a.ln()
        };
        v.signum() * l
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
            tf: std::array::from_fn(|k| 1.0 + (k as f32).ln()),
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
                    *v = self.sublinear(*v);
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

    /// The tokenizer as first written: one character at a time into a
    /// buffer, then `hash_bytes`. The fast path must agree with it exactly.
    fn reference(p: &mut HashedNgrams, text: &str, out: &mut Features) {
        let mut prev: Option<u64> = None;
        let mut chars = 0usize;
        p.token.clear();
        let flush = |p: &mut HashedNgrams, chars, prev: &mut Option<u64>, out: &mut Features| {
            let h = hash_bytes(&p.token);
            p.finish_hash(h, chars, prev, out);
            p.token.clear();
        };
        for c in text.chars() {
            if (c.is_ascii() && (c.is_ascii_alphanumeric() || c == '_'))
                || (!c.is_ascii() && c.is_alphanumeric())
            {
                let mut buf = [0u8; 4];
                if p.lowercase && c.is_uppercase() {
                    for l in c.to_lowercase() {
                        p.token
                            .extend_from_slice(l.encode_utf8(&mut buf).as_bytes());
                    }
                } else {
                    p.token
                        .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                chars += 1;
            } else if chars > 0 {
                flush(p, chars, &mut prev, out);
                chars = 0;
            }
        }
        if chars > 0 {
            flush(p, chars, &mut prev, out);
        }
    }

    /// Deterministic text mixing every class the tokenizer distinguishes:
    /// ASCII words of every length around the 8-byte words, capitals,
    /// digits, `_`, punctuation, accented and non-Latin letters, capitals
    /// that lowercase to several characters, and non-letter symbols.
    fn mixed_text(seed: u64, len: usize) -> String {
        const PIECES: &[&str] = &[
            "a",
            "Ab",
            "ABCDEFGH",
            "abcdefghi",
            "Hello",
            "WORLD_42",
            "x9",
            "_",
            " ",
            "  ",
            "\n",
            ".",
            ",",
            "-",
            "'",
            "@",
            "\t",
            "é",
            "É",
            "ß",
            "İ",
            "Σ",
            "ς",
            "中文",
            "٣",
            "—",
            "“",
            "”",
            "€",
            "😀",
            "ǅ",
            "ﬁ",
            "Ⅻ",
            "naïve",
            "CAFÉ",
            "Straße",
            "0123456789",
            "LONGWORDWITHCAPITALSANDMORE",
            "z",
        ];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut s = String::new();
        while s.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(PIECES[(x % PIECES.len() as u64) as usize]);
        }
        s
    }

    #[test]
    fn the_fast_tokenizer_matches_the_reference_exactly() -> Result<(), PluginError> {
        for pairs in [
            &[][..],
            &[("lowercase", "false")][..],
            &[("min_token_len", "1"), ("ngrams", "1")][..],
            &[("min_token_len", "5")][..],
        ] {
            let mut p = plugin(pairs)?;
            for seed in 0..400 {
                let text = mixed_text(seed, (seed as usize * 7) % 300);
                let (mut fast, mut slow) = (
                    Features::with_capacity(1, 64),
                    Features::with_capacity(1, 64),
                );
                p.featurize_text(&text, &mut fast);
                reference(&mut p, &text, &mut slow);
                assert_eq!(
                    fast.current_row_mut(),
                    slow.current_row_mut(),
                    "{pairs:?} {text:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_fast_tokenizer_matches_the_reference_on_the_bundled_corpus()
    -> Result<(), Box<dyn std::error::Error>> {
        use std::io::BufRead;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../data/spamassassin/spamassassin.jsonl.gz"
        );
        let file = std::fs::File::open(path)?;
        let lines = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file)).lines();
        let mut p = plugin(&[])?;
        let mut texts = 0;
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            let text = v["text"].as_str().ok_or("record without text")?;
            let (mut fast, mut slow) = (
                Features::with_capacity(1, 512),
                Features::with_capacity(1, 512),
            );
            p.featurize_text(text, &mut fast);
            reference(&mut p, text, &mut slow);
            assert_eq!(
                fast.current_row_mut(),
                slow.current_row_mut(),
                "{}",
                v["id"]
            );
            texts += 1;
        }
        assert!(texts > 6000, "{texts} texts");
        Ok(())
    }

    #[test]
    fn swar_word_classes_match_the_byte_table() {
        for seed in 0..4000u64 {
            let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
            x ^= x >> 31;
            let bytes = x.to_le_bytes();
            let m = word_mask(x).to_le_bytes();
            for (b, m) in bytes.iter().zip(m) {
                assert_eq!(
                    m == 0x80,
                    CLASS[usize::from(*b)] == WORD,
                    "{b:#x} in {x:#x}"
                );
                assert!(m == 0 || m == 0x80);
            }
        }
        // Every byte value, in every lane.
        for b in 0..=255u8 {
            for lane in 0..8 {
                let w = u64::from(b) << (8 * lane) | 0x2020_2020_2020_2020 & !(0xFF << (8 * lane));
                let got = word_mask(w) >> (8 * lane) & 0x80 != 0;
                assert_eq!(got, CLASS[usize::from(b)] == WORD, "{b:#x} lane {lane}");
            }
        }
    }

    #[test]
    fn swar_lowercasing_matches_bytewise() {
        for seed in 0..2000u64 {
            let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
            x ^= x >> 29;
            // Only bytes below 0x80 reach the word path.
            let w = x & 0x7F7F_7F7F_7F7F_7F7F;
            let mut want = w.to_le_bytes();
            want.iter_mut().for_each(|b| *b = b.to_ascii_lowercase());
            assert_eq!(lower_ascii_word(w), u64::from_le_bytes(want), "{w:#x}");
        }
    }

    #[test]
    fn the_tf_table_is_bit_identical_to_ln() -> Result<(), PluginError> {
        let p = plugin(&[])?;
        for k in 1..200u32 {
            for sign in [1.0f32, -1.0] {
                let v = sign * k as f32;
                assert_eq!(
                    p.sublinear(v).to_bits(),
                    (v.signum() * (1.0 + v.abs().ln())).to_bits()
                );
            }
        }
        assert_eq!(p.sublinear(2.5), 1.0 + 2.5f32.ln());
        Ok(())
    }

    #[test]
    fn bad_config_names_key() {
        let e = plugin(&[("bits", "40")]).err();
        assert_eq!(e.and_then(|e| e.key).as_deref(), Some("bits"));
    }
}
