//! Records from CSV: a header row, then one record per row.
//!
//! The id column (default `id`) and the label column (default `label`; an
//! empty cell means unlabeled) are taken by name. Columns listed as numeric
//! must hold finite numbers (an empty cell means absent); `*` among them
//! stands for every column not listed as text. Every other column is a
//! text field, unless text columns are listed, in which case the rest are
//! ignored. Errors name the file, the line and the column.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::records::{
    EVERY_OTHER_FIELD, RecordError, RecordSource, Schema, field_name_problem, id_or_label_problem,
};
use crate::types::{DataRecord, Numeric, NumericField, TextField};

/// Streams records out of CSV.
pub struct CsvReader<R: Read> {
    file: PathBuf,
    reader: csv::Reader<R>,
    headers: Vec<String>,
    id_col: usize,
    label_col: Option<usize>,
    /// (column, is numeric) for each kept column.
    columns: Vec<(usize, bool)>,
    line: u64,
    row: csv::StringRecord,
}

impl<R: Read> std::fmt::Debug for CsvReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvReader")
            .field("file", &self.file)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

impl<R: Read> CsvReader<R> {
    /// Reads the header and resolves the schema's columns.
    pub fn new(file: impl Into<PathBuf>, input: R, schema: &Schema) -> Result<Self, RecordError> {
        let file = file.into();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(input);
        let err = |field: Option<&str>, problem: String| RecordError::Line {
            file: file.clone(),
            line: 1,
            field: field.map(str::to_string),
            problem,
        };
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| {
                err(
                    None,
                    format!("cannot read the header row: {}", csv_problem(&e)),
                )
            })?
            .iter()
            .map(str::to_string)
            .collect();
        let find = |name: &str| headers.iter().position(|h| h == name);
        let id_col = find(&schema.id_field).ok_or_else(|| {
            err(
                Some(&schema.id_field),
                "no such column in the header (the id column is required)".into(),
            )
        })?;
        let label_col = find(&schema.label_field);
        for list in [&schema.text_fields, &schema.numeric_fields]
            .into_iter()
            .flatten()
        {
            for name in list {
                if name != EVERY_OTHER_FIELD && find(name).is_none() {
                    return Err(err(Some(name), "no such column in the header".into()));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for h in &headers {
            if !seen.insert(h) {
                return Err(err(Some(h), "the header names this column twice".into()));
            }
        }
        let listed_text = |name: &String| {
            schema
                .text_fields
                .as_ref()
                .is_some_and(|l| l.contains(name))
        };
        let numeric = |name: &String| {
            schema
                .numeric_fields
                .as_ref()
                .is_some_and(|l| l.contains(name))
                || (schema.every_other_numeric() && !listed_text(name))
        };
        let text = |name: &String| schema.text_fields.as_ref().is_none_or(|l| l.contains(name));
        let columns = headers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != id_col && Some(*i) != label_col)
            .filter_map(|(i, h)| {
                if numeric(h) {
                    Some((i, true))
                } else if text(h) {
                    Some((i, false))
                } else {
                    None
                }
            })
            .collect::<Vec<(usize, bool)>>();
        for &(i, _) in &columns {
            if let Some(problem) = field_name_problem(&headers[i]) {
                let named = (!headers[i].is_empty()).then_some(headers[i].as_str());
                return Err(err(named, format!("column {}: {problem}", i + 1)));
            }
        }
        Ok(Self {
            file,
            reader,
            headers,
            id_col,
            label_col,
            columns,
            line: 1,
            row: csv::StringRecord::new(),
        })
    }

    fn err(&self, field: Option<&str>, problem: impl Into<String>) -> RecordError {
        RecordError::Line {
            file: self.file.clone(),
            line: self.line,
            field: field.map(str::to_string),
            problem: problem.into(),
        }
    }

    fn parse(&self) -> Result<DataRecord, RecordError> {
        let cell = |i: usize| self.row.get(i).unwrap_or("");
        let id_name = &self.headers[self.id_col];
        let id = cell(self.id_col).to_string();
        if let Some(problem) = id_or_label_problem(&id) {
            return Err(self.err(Some(id_name), format!("the id {problem}")));
        }
        let label = match self.label_col.map(cell) {
            None | Some("") => None,
            Some(l) => match id_or_label_problem(l) {
                None => Some(l.to_string()),
                Some(problem) => {
                    let name = self.label_col.map(|c| self.headers[c].as_str());
                    return Err(self.err(name, format!("the label {problem}")));
                }
            },
        };
        let mut record = DataRecord {
            id,
            texts: Vec::new(),
            numerics: Vec::new(),
            label,
        };
        for &(i, numeric) in &self.columns {
            let name = &self.headers[i];
            let value = cell(i);
            if numeric {
                let v = match number_cell(value) {
                    NumberCell::Empty => continue,
                    NumberCell::Number(v) => v,
                    NumberCell::NotANumber => {
                        return Err(self.err(Some(name), "not a finite number"));
                    }
                };
                record.numerics.push(NumericField {
                    name: name.clone(),
                    value: Numeric::Scalar(v),
                });
            } else {
                record.texts.push(TextField {
                    name: name.clone(),
                    value: value.to_string(),
                });
            }
        }
        Ok(record)
    }
}

/// A numeric column's cell as the importer reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NumberCell {
    /// Empty (or spaces): the field is absent from that record.
    Empty,
    /// A finite number (surrounding spaces allowed).
    Number(f64),
    /// Anything else: the importer refuses the row.
    NotANumber,
}

/// How the importer reads `value` in a numeric column.
pub fn number_cell(value: &str) -> NumberCell {
    let value = value.trim();
    if value.is_empty() {
        return NumberCell::Empty;
    }
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => NumberCell::Number(v),
        _ => NumberCell::NotANumber,
    }
}

fn csv_problem(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("expected {expected_len} columns like the header, found {len}")
        }
        csv::ErrorKind::Io(io) => io.to_string(),
        _ => "malformed CSV".into(),
    }
}

impl<R: Read> Iterator for CsvReader<R> {
    type Item = Result<DataRecord, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.reader.read_record(&mut self.row) {
            Ok(false) => None,
            Ok(true) => {
                self.line = self.row.position().map_or(self.line + 1, |p| p.line());
                Some(self.parse())
            }
            Err(e) => {
                if let Some(p) = e.position() {
                    self.line = p.line();
                } else {
                    self.line += 1;
                }
                Some(Err(self.err(None, csv_problem(&e))))
            }
        }
    }
}

impl<R: Read> RecordSource for CsvReader<R> {
    fn file(&self) -> &Path {
        &self.file
    }
    fn line(&self) -> u64 {
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, schema: &Schema) -> Result<Vec<DataRecord>, RecordError> {
        CsvReader::new("in.csv", text.as_bytes(), schema)?.collect()
    }

    #[test]
    fn columns_become_fields_by_name() {
        let schema = Schema {
            numeric_fields: Some(vec!["len".into()]),
            ..Schema::default()
        };
        let rs = read("id,text,label,len\n1,hello,spam,3\n2,\"a, b\",,\n", &schema).expect("reads");
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].text("text"), Some("hello"));
        assert_eq!(rs[0].label.as_deref(), Some("spam"));
        assert_eq!(rs[0].numeric("len"), Some(&Numeric::Scalar(3.0)));
        assert_eq!(rs[1].text("text"), Some("a, b"));
        assert_eq!(rs[1].label, None);
        assert_eq!(rs[1].numeric("len"), None);
    }

    #[test]
    fn a_star_makes_every_column_not_listed_as_text_numeric() {
        let schema = Schema {
            numeric_fields: Some(vec!["*".into()]),
            ..Schema::default()
        };
        let rs = read("id,a,label,b\n1,0.5,x,-2e3\n2,,y,7\n", &schema).expect("reads");
        assert_eq!(rs[0].numeric("a"), Some(&Numeric::Scalar(0.5)));
        assert_eq!(rs[0].numeric("b"), Some(&Numeric::Scalar(-2000.0)));
        assert!(rs[0].texts.is_empty());
        assert_eq!(rs[1].numeric("a"), None, "an empty cell is absent");
        let e = read("id,a,b\n1,2,3\n2,4,four\n", &schema).expect_err("a text cell");
        assert_eq!(e.to_string(), "in.csv:3: field `b`: not a finite number");
        let schema = Schema {
            text_fields: Some(vec!["note".into()]),
            numeric_fields: Some(vec!["*".into()]),
            ..Schema::default()
        };
        let rs = read("id,note,a\n1,hi there,3\n", &schema).expect("reads");
        assert_eq!(rs[0].text("note"), Some("hi there"));
        assert_eq!(rs[0].numeric("a"), Some(&Numeric::Scalar(3.0)));
    }

    #[test]
    fn errors_name_line_and_column() {
        let schema = Schema {
            numeric_fields: Some(vec!["len".into()]),
            ..Schema::default()
        };
        let e = read("id,text,len\n1,a,3\n2,b,three\n", &schema).expect_err("bad number");
        assert_eq!(e.to_string(), "in.csv:3: field `len`: not a finite number");
        let e = read("id,text\n1,a\n2,b,c\n", &Schema::default()).expect_err("ragged");
        assert!(
            e.to_string().starts_with("in.csv:3: expected 2 columns"),
            "{e}"
        );
        let e = read("name,text\n1,a\n", &Schema::default()).expect_err("no id");
        assert!(e.to_string().starts_with("in.csv:1: field `id`"), "{e}");
        let e = read("id,text\n,a\n", &Schema::default()).expect_err("empty id");
        assert!(e.to_string().starts_with("in.csv:2: field `id`"), "{e}");
    }

    #[test]
    fn stored_columns_need_plain_names_and_labels_plain_text() {
        let e = read("id,,label\n1,a,c\n", &Schema::default()).expect_err("unnamed");
        assert_eq!(
            e.to_string(),
            "in.csv:1: column 2: a stored field needs a name (this one is empty)"
        );
        let e = read("id,te\u{7}xt\n1,a\n", &Schema::default()).expect_err("bell");
        assert!(
            e.to_string()
                .starts_with("in.csv:1: field `te\\u{0007}xt`: column 2: the field name holds"),
            "{e}"
        );
        let long = "x".repeat(129);
        assert!(read(&format!("id,{long}\n1,a\n"), &Schema::default()).is_err());
        // A column that is not kept needs no name.
        let only_text = Schema {
            text_fields: Some(vec!["text".into()]),
            ..Schema::default()
        };
        assert!(read("id,text,\n1,a,b\n", &only_text).is_ok());
        let e = read("id,text,label\n1,a,sp\u{202e}am\n", &Schema::default()).expect_err("rlo");
        assert_eq!(
            e.to_string(),
            "in.csv:2: field `label`: the label holds a control, bidirectional or invisible format character"
        );
    }
}
