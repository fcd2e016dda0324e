//! `tfidf`: a fitted featurizer for text. It learns a vocabulary of word
//! n-grams and their document frequencies from the training split, then
//! maps each record to TF-IDF weights over that vocabulary: term counts
//! (sublinear, `1 + ln(count)`, by default) times the smoothed inverse
//! document frequency `ln((1 + n) / (1 + df)) + 1`, each row L2-normalised.
//!
//! Fitting is the host's: this plugin only names the n-grams of each
//! training record ([`FittedFeaturizer::terms`]); the host counts them and
//! keeps the ones at least k records contain (the environment's minimum
//! cell size, 10 by default), so the vocabulary never holds a term that
//! singles out a record. `min_df`, `max_df` and `max_features` narrow it
//! further when it is loaded.
//!
//! A token is a maximal run of letters, digits and `_` of at least
//! `min_token_len` characters, lowercased when `lowercase` is true; an
//! n-gram is `n` consecutive tokens.
//!
//! With `char_ngrams = "LO-HI"` the terms also include the character
//! n-grams (LO to HI characters) of each token padded with a space on
//! either side, as scikit-learn's `char_wb` analyzer makes them. A rare
//! word — a name, a signature — is then still seen through the pieces it
//! shares with at least k records, which is what keeps the vocabulary's
//! floor from costing accuracy (docs/disclosure.md). Words and character
//! n-grams are two blocks of the row, each normalised on its own, then
//! scaled together to unit length, so the many character n-grams do not
//! drown the words.
//!
//! With `tail_buckets = N` a word or bigram the vocabulary does not hold —
//! one fewer than k training records share, or one never seen — is not
//! dropped: it is hashed into one of N buckets after the vocabulary's
//! columns, a third block of the row (`1 + ln(count)` per bucket, no IDF:
//! the vocabulary knows nothing of these words). Many rare words share a
//! bucket, and a template with `min_support = k` (the default) learns only
//! the buckets at least k training records reach, so every weight it
//! learns is still one at least k records support, while the rare words'
//! signal — the names and signatures that recur in a corpus of replies —
//! is not all lost (docs/disclosure.md says what this does and does not
//! hide).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use cloister_plugin_sdk::{
    Config, ConfigKey, Features, Featurizer, FittedFeaturizer, Plugin, PluginError, Record,
    Vocabulary, term_key, term_key_parts,
};

/// Term keys are already hashes: mix once more and use them as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = (k ^ (k >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
}

type KeyMap = HashMap<u64, u32, BuildHasherDefault<KeyHasher>>;

/// The featurizer.
#[derive(Debug, Clone)]
pub struct Tfidf {
    field: String,
    max_n: u32,
    min_token_len: usize,
    lowercase: bool,
    min_df: u32,
    max_df: f64,
    max_features: u32,
    sublinear_tf: bool,
    l2: bool,
    /// Lengths of the character n-grams, or `None` for words only.
    chars: Option<(usize, usize)>,
    /// Buckets for the words and bigrams outside the vocabulary (0: none).
    tail: u32,
    /// Per vocabulary feature, whether it is a character n-gram (the key's
    /// low bit), once loaded; empty for words only.
    is_char: Vec<bool>,
    /// Term key → feature index, once loaded.
    index: KeyMap,
    /// Inverse document frequency of each feature.
    idf: Vec<f32>,
    token: String,
    prev: String,
    /// The padded token's characters, for its character n-grams.
    padded: Vec<char>,
}

/// The mark of a character n-gram's key: the first byte hashed (no token
/// holds it, so no word or bigram key is the key of a character n-gram
/// but by a 64-bit collision).
const CHAR_MARK: u8 = 1;

/// With character n-grams on, a key's low bit says which block it is in:
/// words and bigrams have it clear, character n-grams set.
fn word_key(k: u64) -> u64 {
    k & !1
}
fn char_key(k: u64) -> u64 {
    k | 1
}

impl Tfidf {
    /// Call `f` with the key of every n-gram of `text`, in order (repeats
    /// included).
    pub fn each_term(&mut self, text: &str, mut f: impl FnMut(u64)) {
        let mut token = std::mem::take(&mut self.token);
        let mut prev = std::mem::take(&mut self.prev);
        let mut padded = std::mem::take(&mut self.padded);
        token.clear();
        prev.clear();
        let mut have_prev = false;
        let mut chars = 0usize;
        let grams = self.chars;
        let mark = if grams.is_some() { word_key } else { |k| k };
        let mut finish = |token: &mut String, chars: usize, prev: &mut String, have: &mut bool| {
            if chars >= self.min_token_len {
                f(mark(term_key(token)));
                if self.max_n >= 2 && *have {
                    f(mark(term_key_parts(&[prev, token])));
                }
                if let Some((lo, hi)) = grams {
                    padded.clear();
                    padded.push(' ');
                    padded.extend(token.chars());
                    padded.push(' ');
                    char_grams(&padded, lo, hi, &mut f);
                }
                std::mem::swap(prev, token);
                *have = true;
            }
            token.clear();
        };
        for c in text.chars() {
            if c.is_alphanumeric() || c == '_' {
                if self.lowercase && !c.is_lowercase() {
                    token.extend(c.to_lowercase());
                } else {
                    token.push(c);
                }
                chars += 1;
            } else if chars > 0 {
                finish(&mut token, chars, &mut prev, &mut have_prev);
                chars = 0;
            }
        }
        if chars > 0 {
            finish(&mut token, chars, &mut prev, &mut have_prev);
        }
        self.token = token;
        self.prev = prev;
        self.padded = padded;
    }

    fn text<'r>(&self, record: &'r Record) -> Result<&'r str, PluginError> {
        record.text(&self.field).ok_or_else(|| {
            PluginError::invalid_input(format!(
                "record {} has no text field {:?}",
                record.id, self.field
            ))
        })
    }
}

/// Calls `f` with the key of every character n-gram of `padded` (a token
/// with a space on either side) from `lo` to `hi` characters, every window
/// of each length that fits; a padded token shorter than `lo` gives itself
/// once (scikit-learn's `char_wb`).
fn char_grams(padded: &[char], lo: usize, hi: usize, f: &mut impl FnMut(u64)) {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let marked = (OFFSET ^ u64::from(CHAR_MARK)).wrapping_mul(PRIME);
    let len = padded.len();
    let mut buf = [0u8; 4];
    let mut extend = |h: u64, c: char| {
        c.encode_utf8(&mut buf)
            .bytes()
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
    };
    if len < lo {
        f(char_key(padded.iter().fold(marked, |h, &c| extend(h, c))));
        return;
    }
    for start in 0..len {
        // The n-grams starting here, each hash extending the last one.
        let mut h = marked;
        for (i, &c) in padded[start..len.min(start + hi)].iter().enumerate() {
            h = extend(h, c);
            if i + 1 >= lo {
                f(char_key(h));
            }
        }
    }
}

impl Plugin for Tfidf {
    const NAME: &'static str = "tfidf";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "TF-IDF of word n-grams (and optionally character n-grams) over a vocabulary fitted on the training split (terms at least k training records share)";

    fn config_keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new("field", "text", "the text field to featurize"),
            ConfigKey::new(
                "ngrams",
                "2",
                "largest n-gram: 1 (words) or 2 (words and bigrams)",
            ),
            ConfigKey::new(
                "char_ngrams",
                "0",
                "also character n-grams of each token padded with spaces, \"LO-HI\" characters \
                 (1 <= LO <= HI <= 8, e.g. \"2-5\"), or 0 for none",
            ),
            ConfigKey::new(
                "tail_buckets",
                "0",
                "hash the words and bigrams outside the vocabulary into this many buckets after \
                 its columns (0..=1048576; 0 drops them); the template learns only the buckets \
                 at least k training records reach",
            ),
            ConfigKey::new(
                "min_token_len",
                "2",
                "shortest token kept, in characters (1..=64)",
            ),
            ConfigKey::new("lowercase", "true", "lowercase tokens"),
            ConfigKey::new(
                "min_df",
                "1",
                "fewest training records a term must occur in (the environment's minimum, \
                 10 by default, applies first)",
            ),
            ConfigKey::new(
                "max_df",
                "1.0",
                "drop terms in more than this share of training records (0 < max_df <= 1)",
            ),
            ConfigKey::new(
                "max_features",
                "262144",
                "keep at most this many terms, the most frequent (1..=1048576)",
            ),
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
        let chars = parse_char_ngrams(config.get_str("char_ngrams")?)
            .map_err(|why| PluginError::invalid_config("char_ngrams", why))?;
        let field = config.get_str("field")?.to_string();
        if field.is_empty() {
            return Err(PluginError::invalid_config("field", "must not be empty"));
        }
        let min_df: u32 = config.get("min_df")?;
        if min_df == 0 {
            return Err(PluginError::invalid_config("min_df", "must be at least 1"));
        }
        let max_df: f64 = config.get("max_df")?;
        if !(max_df > 0.0 && max_df <= 1.0) {
            return Err(PluginError::invalid_config(
                "max_df",
                "must be above 0 and at most 1",
            ));
        }
        let tail: u32 = config.get("tail_buckets")?;
        if tail > 1 << 20 {
            return Err(PluginError::invalid_config(
                "tail_buckets",
                "must be between 0 and 1048576",
            ));
        }
        let max_features: u32 = config.get("max_features")?;
        if !(1..=1 << 20).contains(&max_features) {
            return Err(PluginError::invalid_config(
                "max_features",
                "must be between 1 and 1048576",
            ));
        }
        Ok(Tfidf {
            field,
            max_n,
            min_token_len,
            lowercase: config.get_bool("lowercase")?,
            min_df,
            max_df,
            max_features,
            sublinear_tf: config.get_bool("sublinear_tf")?,
            l2: config.get_bool("l2_normalize")?,
            chars,
            tail,
            is_char: Vec::new(),
            index: KeyMap::default(),
            idf: Vec::new(),
            token: String::with_capacity(64),
            prev: String::with_capacity(64),
            padded: Vec::with_capacity(66),
        })
    }
}

/// The tail bucket (of `buckets`) of a word or bigram key outside the
/// vocabulary: the key's high bits, mixed once more so that the bucket
/// does not follow the word block's low-bit mark.
fn tail_bucket(key: u64, buckets: u32) -> u32 {
    let k = (key ^ (key >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((k >> 32) % u64::from(buckets)) as u32
}

/// `"0"` (none) or `"LO-HI"` with `1 <= LO <= HI <= 8`.
fn parse_char_ngrams(v: &str) -> Result<Option<(usize, usize)>, &'static str> {
    const RULE: &str = "must be 0 or LO-HI with 1 <= LO <= HI <= 8, e.g. 2-5";
    let v = v.trim();
    if v == "0" {
        return Ok(None);
    }
    let (lo, hi) = v.split_once('-').ok_or(RULE)?;
    let lo: usize = lo.trim().parse().map_err(|_| RULE)?;
    let hi: usize = hi.trim().parse().map_err(|_| RULE)?;
    if !(1 <= lo && lo <= hi && hi <= 8) {
        return Err(RULE);
    }
    Ok(Some((lo, hi)))
}

impl FittedFeaturizer for Tfidf {
    fn terms(&mut self, record: &Record, out: &mut Vec<u64>) -> Result<(), PluginError> {
        let text = self.text(record)?;
        self.each_term(text, |k| out.push(k));
        Ok(())
    }

    fn load(&mut self, v: &Vocabulary) -> Result<(), PluginError> {
        let n = f64::from(v.documents);
        let most = (self.max_df * n).floor();
        let mut kept: Vec<(u64, u32)> = v
            .keys
            .iter()
            .zip(&v.document_frequencies)
            .filter(|&(_, &df)| df >= self.min_df && f64::from(df) <= most)
            .map(|(&k, &df)| (k, df))
            .collect();
        if kept.len() > self.max_features as usize {
            kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            kept.truncate(self.max_features as usize);
            kept.sort_unstable_by_key(|&(k, _)| k);
        }
        if kept.is_empty() {
            return Err(PluginError::unsupported(
                "no term of the vocabulary passes min_df and max_df",
            ));
        }
        self.index = kept
            .iter()
            .enumerate()
            .map(|(i, &(k, _))| (k, i as u32))
            .collect();
        self.idf = kept
            .iter()
            .map(|&(_, df)| (((1.0 + n) / (1.0 + f64::from(df))).ln() + 1.0) as f32)
            .collect();
        self.is_char = match self.chars {
            Some(_) => kept.iter().map(|&(k, _)| k & 1 == 1).collect(),
            None => Vec::new(),
        };
        Ok(())
    }
}

impl Featurizer for Tfidf {
    fn dimension(&self) -> u32 {
        self.idf.len() as u32 + self.tail
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        let text = self.text(record)?;
        let index = std::mem::take(&mut self.index);
        let (first, tail) = (self.idf.len() as u32, self.tail);
        // Only words and bigrams go to the tail: a character n-gram's key
        // has its low bit set when there are character n-grams.
        let words_only = self.chars.is_none();
        self.each_term(text, |k| {
            if let Some(&i) = index.get(&k) {
                out.push(i, 1.0);
            } else if tail > 0 && (words_only || k & 1 == 0) {
                out.push(first + tail_bucket(k, tail), 1.0);
            }
        });
        self.index = index;
        Ok(())
    }

    fn finish_row(&self, indices: &[u32], values: &mut [f32]) {
        let first = self.idf.len();
        for (v, &i) in values.iter_mut().zip(indices) {
            let tf = if self.sublinear_tf { 1.0 + v.ln() } else { *v };
            *v = tf * self.idf.get(i as usize).copied().unwrap_or(1.0);
        }
        if !self.l2 {
            return;
        }
        // Blocks — words, character n-grams, the tail's buckets — each to
        // unit length, then the row to unit length.
        let block = |i: u32| -> usize {
            match self.is_char.get(i as usize) {
                Some(true) => 1,
                Some(false) => 0,
                None if (i as usize) < first => 0,
                None => 2,
            }
        };
        let mut sums = [0f32; 3];
        for (v, &i) in values.iter().zip(indices) {
            sums[block(i)] += v * v;
        }
        let present = sums.iter().filter(|&&s| s > 0.0).count() as f32;
        let scale = sums.map(|s| {
            if s > 0.0 {
                1.0 / (s.sqrt() * present.sqrt())
            } else {
                0.0
            }
        });
        for (v, &i) in values.iter_mut().zip(indices) {
            *v *= scale[block(i)];
        }
    }
}

cloister_plugin_sdk::export_fitted_featurizer!(Tfidf);

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_plugin_sdk::testing;

    fn plugin(pairs: &[(&str, &str)]) -> Result<Tfidf, PluginError> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Tfidf::configure(&Config::new(&Tfidf::config_keys(), pairs)?)
    }

    fn record(text: &str) -> Record {
        Record::new("r").with_text("text", text)
    }

    /// The host's fit (`testing::fit_vocabulary`: each record's keys from a
    /// fresh instance configured with `pairs`, kept where `k` records have
    /// them).
    fn fit(pairs: &[(&str, &str)], texts: &[&str], k: u32) -> Vocabulary {
        let records: Vec<Record> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Record::new(format!("r{i}")).with_text("text", *t))
            .collect();
        match testing::fit_vocabulary::<Tfidf>(pairs, &records, k) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn terms_are_words_and_bigrams_case_folded() -> Result<(), PluginError> {
        let mut p = plugin(&[])?;
        let mut keys = Vec::new();
        p.terms(&record("New York, new YORK a"), &mut keys)?;
        assert_eq!(
            keys,
            vec![
                term_key("new"),
                term_key("york"),
                term_key("new york"),
                term_key("new"),
                term_key("york new"),
                term_key("york"),
                term_key("new york"),
            ],
            "`a` is shorter than min_token_len"
        );
        Ok(())
    }

    #[test]
    fn weights_are_sublinear_tf_times_smoothed_idf_l2_normalised() -> Result<(), PluginError> {
        let pairs = [("ngrams", "1")];
        let mut p = plugin(&pairs)?;
        let v = fit(&pairs, &["cat dog", "cat", "cat bird", "dog"], 1);
        p.load(&v)?;
        assert_eq!(p.dimension(), 3);
        let mut out = Features::with_capacity(1, 4);
        p.featurize_batch(&[record("cat cat dog fish")], &mut out)?;
        let b = out.into_batch();
        // Keys sorted: the feature index follows key order.
        let idx = |w: &str| v.keys.iter().position(|&k| k == term_key(w)).unwrap() as u32;
        let idf = |df: f64| ((1.0 + 4.0) / (1.0 + df)).ln() + 1.0;
        let cat = (1.0 + 2f64.ln()) * idf(3.0);
        let dog = idf(2.0);
        let norm = (cat * cat + dog * dog).sqrt();
        let want = [(idx("cat"), cat / norm), (idx("dog"), dog / norm)];
        let mut want = want.to_vec();
        want.sort_by_key(|w| w.0);
        assert_eq!(b.indices, want.iter().map(|w| w.0).collect::<Vec<_>>());
        for (got, (_, w)) in b.values.iter().zip(&want) {
            assert!((f64::from(*got) - w).abs() < 1e-6, "{got} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn load_narrows_by_min_df_max_df_and_max_features() -> Result<(), PluginError> {
        let texts = ["aa bb cc", "aa bb", "aa", "aa dd"];
        let pairs = [("ngrams", "1"), ("min_df", "2"), ("max_df", "0.9")];
        let mut p = plugin(&pairs)?;
        let v = fit(&pairs, &texts, 1);
        p.load(&v)?;
        // aa is in all 4 (over 0.9 * 4), cc and dd in one each.
        assert_eq!(p.dimension(), 1, "only bb remains");
        let mut q = plugin(&[("ngrams", "1"), ("max_features", "2")])?;
        q.load(&v)?;
        assert_eq!(q.dimension(), 2, "aa and bb, the most frequent");
        let mut r = plugin(&[("ngrams", "1"), ("min_df", "5")])?;
        assert!(r.load(&v).is_err(), "nothing left");
        Ok(())
    }

    /// The key of a character n-gram, hashed the long way.
    fn gram_key(gram: &str) -> u64 {
        let mut bytes = vec![CHAR_MARK];
        bytes.extend_from_slice(gram.as_bytes());
        let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        h | 1
    }

    #[test]
    fn character_ngrams_are_the_padded_tokens_windows_in_a_block_of_their_own()
    -> Result<(), PluginError> {
        let mut p = plugin(&[("ngrams", "1"), ("char_ngrams", "2-3")])?;
        let mut keys = Vec::new();
        p.terms(&record("Ab é"), &mut keys)?;
        let mut want = vec![
            word_key(term_key("ab")),
            gram_key(" a"),
            gram_key(" ab"),
            gram_key("ab"),
            gram_key("ab "),
            gram_key("b "),
        ];
        // "é" is one token of one (two-byte) character: " é" "é " and " é ".
        want.extend([
            word_key(term_key("é")),
            gram_key(" é"),
            gram_key(" é "),
            gram_key("é "),
        ]);
        let pairs1 = [
            ("ngrams", "1"),
            ("char_ngrams", "2-3"),
            ("min_token_len", "1"),
        ];
        let mut p1 = plugin(&pairs1)?;
        let mut keys1 = Vec::new();
        p1.terms(&record("Ab é"), &mut keys1)?;
        assert_eq!(keys1, want);
        assert_eq!(keys, want[..6], "`é` is shorter than min_token_len 2");
        // A padded token shorter than LO gives itself once.
        let mut q = plugin(&[
            ("ngrams", "1"),
            ("char_ngrams", "4-5"),
            ("min_token_len", "1"),
        ])?;
        keys.clear();
        q.terms(&record("x"), &mut keys)?;
        assert_eq!(keys, vec![word_key(term_key("x")), gram_key(" x ")]);
        // Without character n-grams the word keys are as they always were.
        let mut w = plugin(&[("ngrams", "1")])?;
        keys.clear();
        w.terms(&record("Ab"), &mut keys)?;
        assert_eq!(keys, vec![term_key("ab")]);

        // Each block to unit length, then both scaled by 1/sqrt(2).
        let texts = ["ab cd", "ab", "cd ab", "ef"];
        let v = fit(&pairs1, &texts, 1);
        p1.load(&v)?;
        let mut out = Features::with_capacity(1, 16);
        p1.featurize_batch(&[record("ab ab cd")], &mut out)?;
        let b = out.into_batch();
        let (mut words, mut grams) = (0f64, 0f64);
        for (&i, &x) in b.indices.iter().zip(&b.values) {
            let k = v.keys[i as usize];
            if k & 1 == 1 {
                grams += f64::from(x) * f64::from(x);
            } else {
                words += f64::from(x) * f64::from(x);
            }
        }
        assert!(
            (words - 0.5).abs() < 1e-5 && (grams - 0.5).abs() < 1e-5,
            "{words} {grams}"
        );
        Ok(())
    }

    #[test]
    fn words_outside_the_vocabulary_go_to_the_tail_buckets_in_a_block_of_their_own()
    -> Result<(), PluginError> {
        let texts = ["ab cd", "ab", "cd ab", "ef"];
        // Words only: "zz" and "ef" (not in a k = 2 vocabulary) are tail.
        let pairs = [("ngrams", "1"), ("tail_buckets", "8")];
        let mut p = plugin(&pairs)?;
        let v = fit(&pairs, &texts, 2);
        p.load(&v)?;
        assert_eq!(v.keys.len(), 2, "ab and cd");
        assert_eq!(p.dimension(), 2 + 8);
        let mut out = Features::with_capacity(1, 8);
        p.featurize_batch(&[record("ab zz zz ef")], &mut out)?;
        let b = out.into_batch();
        let bucket = |w: &str| 2 + tail_bucket(term_key(w), 8);
        let mut want = vec![
            v.keys.iter().position(|&k| k == term_key("ab")).unwrap() as u32,
            bucket("zz"),
            bucket("ef"),
        ];
        want.sort_unstable();
        want.dedup();
        assert_eq!(b.indices, want);
        // Two blocks present (words; the tail), each half the row's length.
        let (mut words, mut tail) = (0f64, 0f64);
        for (&i, &x) in b.indices.iter().zip(&b.values) {
            let sq = f64::from(x) * f64::from(x);
            if i < 2 { words += sq } else { tail += sq }
        }
        assert!(
            (words - 0.5).abs() < 1e-5 && (tail - 0.5).abs() < 1e-5,
            "{words} {tail}"
        );
        // The same record without tail buckets: the vocabulary's word only.
        let mut q = plugin(&[("ngrams", "1")])?;
        q.load(&v)?;
        let mut out = Features::with_capacity(1, 8);
        q.featurize_batch(&[record("ab zz zz ef")], &mut out)?;
        assert_eq!(out.into_batch().values, vec![1.0]);
        // With character n-grams, the grams outside the vocabulary are
        // dropped as before; only words reach the tail.
        let pairs = [
            ("ngrams", "1"),
            ("char_ngrams", "2-2"),
            ("tail_buckets", "4"),
        ];
        let mut c = plugin(&pairs)?;
        let v = fit(&pairs, &texts, 2);
        c.load(&v)?;
        let first = v.keys.len() as u32;
        assert_eq!(c.dimension(), first + 4);
        let mut out = Features::with_capacity(1, 8);
        c.featurize_batch(&[record("qq")], &mut out)?;
        let b = out.into_batch();
        assert_eq!(
            b.indices,
            vec![first + tail_bucket(word_key(term_key("qq")), 4)]
        );
        assert_eq!(b.values, vec![1.0]);
        Ok(())
    }

    #[test]
    fn bad_configuration_names_the_key() {
        for (key, value) in [
            ("char_ngrams", "5"),
            ("char_ngrams", "3-2"),
            ("char_ngrams", "0-4"),
            ("char_ngrams", "2-9"),
            ("char_ngrams", "a-b"),
            ("ngrams", "3"),
            ("min_df", "0"),
            ("max_df", "0"),
            ("max_df", "1.5"),
            ("max_features", "0"),
            ("tail_buckets", "1048577"),
            ("tail_buckets", "-1"),
            ("field", ""),
        ] {
            let e = plugin(&[(key, value)]).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{key}={value}");
        }
    }
}
