//! Plugin configuration: string key/values checked against declared keys.

use crate::{ConfigKey, PluginError};
use std::collections::BTreeMap;
use std::str::FromStr;

/// A plugin's configuration: every declared key with its value (given or
/// default). Typed getters return [`PluginError::invalid_config`] naming the
/// key when a value does not parse.
#[derive(Debug, Clone, Default)]
pub struct Config {
    values: BTreeMap<String, String>,
}

impl Config {
    /// Check `pairs` against the declared `keys`: unknown or repeated keys are
    /// an error naming the key; missing keys take their default.
    pub fn new(keys: &[ConfigKey], pairs: Vec<(String, String)>) -> Result<Self, PluginError> {
        let mut values = BTreeMap::new();
        for (key, value) in pairs {
            if !keys.iter().any(|k| k.name == key) {
                return Err(PluginError::invalid_config(
                    &key,
                    "unknown configuration key",
                ));
            }
            if values.insert(key.clone(), value).is_some() {
                return Err(PluginError::invalid_config(
                    &key,
                    "key given more than once",
                ));
            }
        }
        for k in keys {
            values
                .entry(k.name.clone())
                .or_insert_with(|| k.default_value.clone());
        }
        Ok(Config { values })
    }

    /// The raw string value of `key`.
    pub fn get_str(&self, key: &str) -> Result<&str, PluginError> {
        self.values
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| PluginError::invalid_config(key, "key not declared by the plugin"))
    }

    /// Parse the value of `key` as `T`.
    pub fn get<T: FromStr>(&self, key: &str) -> Result<T, PluginError>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.get_str(key)?;
        raw.trim()
            .parse::<T>()
            .map_err(|e| PluginError::invalid_config(key, format!("cannot parse {raw:?}: {e}")))
    }

    /// Parse `key` as a boolean (`true`/`false`, `yes`/`no`, `1`/`0`).
    pub fn get_bool(&self, key: &str) -> Result<bool, PluginError> {
        match self.get_str(key)?.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            other => Err(PluginError::invalid_config(
                key,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }

    /// Parse `key` as a comma-separated list of `T` (empty string: empty list).
    pub fn get_list<T: FromStr>(&self, key: &str) -> Result<Vec<T>, PluginError>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.get_str(key)?;
        if raw.trim().is_empty() {
            return Ok(Vec::new());
        }
        raw.split(',')
            .map(|part| {
                part.trim().parse::<T>().map_err(|e| {
                    PluginError::invalid_config(key, format!("cannot parse {part:?}: {e}"))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn keys() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new("threshold", "0.9", "confidence"),
            ConfigKey::new("flag", "true", "a flag"),
        ]
    }

    #[test]
    fn defaults_fill_and_values_parse() {
        let c = Config::new(&keys(), vec![("threshold".into(), "0.5".into())]).unwrap_or_default();
        assert_eq!(c.get::<f32>("threshold").ok(), Some(0.5));
        assert_eq!(c.get_bool("flag").ok(), Some(true));
    }

    #[test]
    fn unknown_and_bad_values_name_the_key() {
        let e = Config::new(&keys(), vec![("nope".into(), "1".into())]).err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(ErrorCode::InvalidConfig));
        assert_eq!(e.and_then(|e| e.key).as_deref(), Some("nope"));
        let c = Config::new(&keys(), vec![("threshold".into(), "high".into())]).unwrap_or_default();
        let e = c.get::<f32>("threshold").err();
        assert_eq!(e.and_then(|e| e.key).as_deref(), Some("threshold"));
    }
}
