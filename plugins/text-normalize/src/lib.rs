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
pub fn normalize(text: &str, lowercase: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.nfkc() {
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
}
