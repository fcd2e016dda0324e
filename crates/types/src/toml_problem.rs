//! A TOML file's parse error said on one line for the person who wrote
//! the file: the line to look at when one line is to blame, and what is
//! wrong there, naming the key or the table.
//!
//! The TOML parser's own `Display` is a multi-line excerpt with a caret,
//! and for a field missing from the whole file it points at line 1,
//! column 1 — whatever happens to be written there. The environment's
//! files (`cloister.toml`, `limits.toml`) and job specs all report
//! through [`TomlProblem`] instead.

/// What is wrong with a TOML text, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlProblem {
    /// The 1-based line to blame; `None` when the whole file lacks
    /// something (no one line is wrong).
    pub line: Option<usize>,
    /// A top-level key the whole file lacks (then `line` is `None`).
    pub missing: Option<String>,
    /// What is wrong, naming the key or table: `` `environment`: invalid
    /// type: integer `3`, expected a string ``, `` [store]: missing field
    /// `url` ``, `` missing field `store` ``.
    pub message: String,
}

impl TomlProblem {
    /// Reads the parser's error `e` against the `text` it parsed.
    pub fn of(text: &str, e: &toml::de::Error) -> Self {
        // Some messages have a second line (what was expected): one line.
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let message = message.as_str();
        let missing = missing_field(message);
        // A field missing from the whole text: the parser gives the span
        // 0..0 (or the whole text), so no line applies.
        let whole = e
            .span()
            .is_none_or(|s| s.start == 0 && (s.end == 0 || s.end >= text.trim_end().len()));
        if whole && let Some(field) = missing {
            return TomlProblem {
                line: None,
                missing: Some(field.to_string()),
                message: message.to_string(),
            };
        }
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let line_text = line.and_then(|l| text.lines().nth(l - 1)).map(str::trim);
        let message = match missing {
            // A missing field's span is the table that lacks it: name the
            // table as its header line writes it.
            Some(_) => match line_text.and_then(table_header) {
                Some(table) => format!("{table}: {message}"),
                None => message.to_string(),
            },
            // A bad value's span is the value: name its key.
            None => match line_text.and_then(|l| key_of(l, message)) {
                Some(key) => format!("`{key}`: {message}"),
                None => message.to_string(),
            },
        };
        TomlProblem {
            line,
            missing: None,
            message,
        }
    }
}

impl std::fmt::Display for TomlProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The field a TOML "missing field `x`" message names.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// `[name]` or `[[name]]` when `line` is a table header.
fn table_header(line: &str) -> Option<&str> {
    let end = line.find(']')?;
    let header = &line[..=end];
    let header = if line[end + 1..].starts_with(']') {
        &line[..end + 2]
    } else {
        header
    };
    header.starts_with('[').then_some(header)
}

/// The key of a `key = value` line, when it is a plain key the message
/// does not already name.
fn key_of<'a>(line: &'a str, message: &str) -> Option<&'a str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && !message.contains(key)
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    .then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Table {
        url: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        environment: String,
        store: Table,
        #[serde(default)]
        list: Vec<Table>,
    }

    fn problem(text: &str) -> String {
        let e = toml::from_str::<File>(text).expect_err("refused");
        TomlProblem::of(text, &e).to_string()
    }

    #[test]
    fn each_problem_names_its_line_and_key_or_table() {
        assert_eq!(
            problem("environment = \"e\"\n"),
            "missing field `store`",
            "a field the whole file lacks is not blamed on line 1"
        );
        assert_eq!(
            problem("[store]\nurl = \"sled\"\n"),
            "missing field `environment`"
        );
        assert_eq!(
            problem("environment = \"e\"\n[store]\nca = 1\n"),
            "line 3: unknown field `ca`, expected `url`"
        );
        assert_eq!(
            problem("environment = \"e\"\n\n[store]\n"),
            "line 3: [store]: missing field `url`"
        );
        assert_eq!(
            problem("environment = \"e\"\n[store]\nurl = \"s\"\n[[list]]\n"),
            "line 4: [[list]]: missing field `url`"
        );
        assert_eq!(
            problem("environment = 3\n[store]\nurl = \"s\"\n"),
            "line 1: `environment`: invalid type: integer `3`, expected a string"
        );
        let e = problem("environment = \"e\"\n[store\n");
        assert!(e.starts_with("line 2: "), "{e}");
        assert!(
            !e.contains('^') && !e.contains('\n'),
            "one line, no excerpt: {e}"
        );
    }
}
