//! `text-normalize`: a preprocessor for text fields. Applies Unicode NFKC
//! normalisation, lowercases, collapses every run of whitespace to one space
//! and trims; records whose configured text fields are all empty afterwards
//! are dropped (unless `drop_empty` is false).

use cloister_plugin_sdk::{Config, ConfigKey, Plugin, PluginError, Preprocessor, Record};
use unicode_normalization::UnicodeNormalization;

/// The preprocessor.
#[derive(Debug, Clone)]
pub struct TextNormalize {
    fields: Vec<String>,
    lowercase: bool,
    drop_empty: bool,
}

/// NFKC, optional lowercase, whitespace collapsed to single spaces, trimmed.
///
/// Text that is already in NFKC — all ASCII text is, and most other text
/// passes the standard's quick check — is not run through the normalizer:
/// NFKC leaves such text as it is, so only the lowercasing and the
/// whitespace remain, and for ASCII they are done a byte at a time.
pub fn normalize(text: &str, lowercase: bool) -> String {
    if text.is_ascii() {
        return normalize_ascii(text, lowercase);
    }
    match unicode_normalization::is_nfkc_quick(text.chars()) {
        unicode_normalization::IsNormalized::Yes => collapse(text.chars(), lowercase),
        _ => collapse(text.nfkc(), lowercase),
    }
}

/// Lowercasing and collapsing whitespace in characters already normalized.
fn collapse(chars: impl Iterator<Item = char>, lowercase: bool) -> String {
    let mut out = String::new();
    let mut pending_space = false;
    for c in chars {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if lowercase {
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`collapse`] for ASCII text: the same result, byte by byte. The ASCII
/// characters that are Unicode white space are tab, line feed, vertical
/// tab, form feed, carriage return and space (`u8::is_ascii_whitespace`
/// leaves out the vertical tab, so it is not used here).
fn normalize_ascii(text: &str, lowercase: bool) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut pending_space = false;
    for &b in text.as_bytes() {
        if matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ') {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(b' ');
            pending_space = false;
        }
        out.push(if lowercase { b.to_ascii_lowercase() } else { b });
    }
    // Only ASCII bytes were pushed, so this never fails; the fallback
    // keeps the function total without an unwrap.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl Plugin for TextNormalize {
    const NAME: &'static str = "text-normalize";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Unicode NFKC, lowercase, collapse whitespace; drop records left without text";

    fn config_keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new("fields", "text", "comma-separated text fields to normalise"),
            ConfigKey::new("lowercase", "true", "lowercase the text"),
            ConfigKey::new(
                "drop_empty",
                "true",
                "drop records whose fields are all empty",
            ),
        ]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        let fields: Vec<String> = config.get_list("fields")?;
        if fields.is_empty() || fields.iter().any(String::is_empty) {
            return Err(PluginError::invalid_config(
                "fields",
                "needs at least one field name",
            ));
        }
        Ok(TextNormalize {
            fields,
            lowercase: config.get_bool("lowercase")?,
            drop_empty: config.get_bool("drop_empty")?,
        })
    }
}

impl Preprocessor for TextNormalize {
    fn process(&mut self, mut record: Record) -> Result<Option<Record>, PluginError> {
        let mut any_text = false;
        for field in record.texts.iter_mut() {
            if self.fields.contains(&field.name) {
                field.value = normalize(&field.value, self.lowercase);
                any_text |= !field.value.is_empty();
            }
        }
        Ok((any_text || !self.drop_empty).then_some(record))
    }
}

cloister_plugin_sdk::export_preprocessor!(TextNormalize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfkc_lowercase_and_whitespace() {
        assert_eq!(
            normalize("  Ｈｅｌｌｏ\t\n ＷＯＲＬＤ ﬁ  ", true),
            "hello world fi"
        );
        assert_eq!(normalize("A\u{00A0}B", false), "A B");
        assert_eq!(normalize(" \t ", true), "");
    }

    /// The plugin as the host runs it: the records left without text are
    /// dropped, the others kept in order with their fields normalized.
    #[test]
    fn a_batch_keeps_its_ids_in_order_and_drops_the_empty() {
        use cloister_plugin_sdk::testing;
        let mut p: TextNormalize = testing::configure(&[("fields", "title,body")]).unwrap();
        let batch = vec![
            Record::new("a")
                .with_text("title", "  Ｈｉ ")
                .with_text("body", "THERE"),
            Record::new("b").with_text("title", " \t "),
            Record::new("c")
                .with_text("body", "x")
                .with_number("n", 1.5),
        ];
        let out = testing::process(&mut p, batch).unwrap();
        assert_eq!(
            out.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(
            (out[0].text("title"), out[0].text("body")),
            (Some("hi"), Some("there"))
        );
        assert_eq!(out[1].numeric("n").map(|n| n.as_slice()), Some(&[1.5][..]));
        assert!(testing::configure::<TextNormalize>(&[("fields", "")]).is_err());
    }

    /// The fast paths give what NFKC followed by the character loop gives.
    #[test]
    fn fast_paths_agree_with_the_full_normalizer() {
        let texts = [
            "Plain ASCII, Mixed CASE\t\ttabs\nand\r\nlines  ",
            "\x0bvertical\x0ctab and form feed\x1c\x1f not space",
            "caf\u{e9} na\u{ef}ve \u{3a3}\u{391}\u{39b}",
            "decomposed cafe\u{301} and \u{fb01}ligature",
            "fullwidth \u{ff28}\u{ff45}\u{ff4c}\u{ff4c}\u{ff4f}\u{3000}ideographic space",
            "\u{130} dotted capital I, \u{1e9e} capital sharp s",
            "nbsp\u{a0}nel\u{85}line sep\u{2028}end",
            "",
            "   ",
            "\u{2460} circled one, \u{2075} superscript five",
        ];
        for text in texts {
            for lowercase in [true, false] {
                let full = collapse(text.nfkc(), lowercase);
                assert_eq!(normalize(text, lowercase), full, "{text:?}");
            }
        }
    }
}
