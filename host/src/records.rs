//! Records as JSON Lines.
//!
//! One JSON object per line. The id field (default `id`, a string or an
//! integer) and the label field (default `label`, a string, `null` or absent)
//! are taken by name; every other field becomes a text field (a string) or a
//! numeric field (a number or an array of numbers). Any other value is an
//! error naming the file, the line and the field. Blank lines are skipped.
//! Reading streams: memory does not grow with the file.

use std::collections::HashSet;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::types::{
    Action, DataRecord, Decision, Numeric, NumericField, PredictionSet, SparseBatch, TextField,
};

/// Longest line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// A problem with one line of an input file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// File name.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("{file}:{line}: {}{problem}", match .field { Some(f) => format!("field `{}`: ", crate::text::neutralize(f)), None => String::new() })]
    Line {
        /// File name.
        file: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The field at fault, if one.
        field: Option<String>,
        /// What is wrong.
        problem: String,
    },
}

/// The longest field name a dataset keeps, in bytes.
pub const MAX_FIELD_NAME: usize = 128;

/// Why `name` cannot name a stored field, if it cannot. Field names are
/// shown to everyone who may read a dataset's statistics — in terminals as
/// well as pages — so they are non-empty, short, and hold no control,
/// bidirectional or invisible format character (an escape sequence in a
/// name would reach another person's terminal).
pub fn field_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("a stored field needs a name (this one is empty)")
    } else if name.len() > MAX_FIELD_NAME {
        Some("field names are at most 128 bytes")
    } else if name.chars().any(crate::text::is_deceptive) {
        Some("the field name holds a control, bidirectional or invisible format character")
    } else {
        None
    }
}

/// Why a record's id or label cannot be stored, if it cannot: 1 to 256
/// bytes without control, bidirectional or invisible format characters
/// (both are shown to people).
pub fn id_or_label_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() || value.len() > 256 {
        Some("must be 1 to 256 bytes")
    } else if value.chars().any(crate::text::is_deceptive) {
        Some("holds a control, bidirectional or invisible format character")
    } else {
        None
    }
}

/// Which JSON fields mean what.
#[derive(Debug, Clone)]
pub struct Schema {
    /// Field holding the record id.
    pub id_field: String,
    /// Field holding the label.
    pub label_field: String,
    /// Text fields to keep; `None` keeps every string field.
    pub text_fields: Option<Vec<String>>,
    /// Numeric fields to keep; `None` keeps every numeric field. A `*` in
    /// the list means every field not named elsewhere (for CSV, whose
    /// cells have no type: every column but the id, the label and the
    /// listed text columns must hold numbers).
    pub numeric_fields: Option<Vec<String>>,
}

/// The numeric-fields entry that stands for every other field.
pub const EVERY_OTHER_FIELD: &str = "*";

impl Schema {
    /// Whether the numeric fields are "every field not named elsewhere".
    pub fn every_other_numeric(&self) -> bool {
        self.numeric_fields
            .as_ref()
            .is_some_and(|l| l.iter().any(|f| f == EVERY_OTHER_FIELD))
    }
}

impl Default for Schema {
    fn default() -> Self {
        Schema {
            id_field: "id".into(),
            label_field: "label".into(),
            text_fields: None,
            numeric_fields: None,
        }
    }
}

/// Streams records out of a JSONL source, checking ids are unique.
pub struct JsonlReader<R> {
    file: PathBuf,
    input: R,
    schema: Schema,
    line_no: u64,
    buf: String,
    seen: Option<HashSet<String>>,
}

impl<R> std::fmt::Debug for JsonlReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlReader")
            .field("file", &self.file)
            .field("line", &self.line_no)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> JsonlReader<R> {
    /// Read from `input`, naming `file` in errors.
    pub fn new(file: impl Into<PathBuf>, input: R, schema: Schema) -> Self {
        JsonlReader {
            file: file.into(),
            input,
            schema,
            line_no: 0,
            buf: String::new(),
            seen: Some(HashSet::new()),
        }
    }

    /// Stops checking ids for uniqueness in memory: the caller checks
    /// them (the dataset import does, against the store, so that memory
    /// stays constant however long the file).
    pub fn without_duplicate_check(mut self) -> Self {
        self.seen = None;
        self
    }

    fn err(&self, field: Option<&str>, problem: impl Into<String>) -> RecordError {
        RecordError::Line {
            file: self.file.clone(),
            line: self.line_no,
            field: field.map(str::to_string),
            problem: problem.into(),
        }
    }

    fn parse(&mut self, obj: Map<String, Value>) -> Result<DataRecord, RecordError> {
        let id = match obj.get(&self.schema.id_field) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(Value::String(_)) => {
                return Err(self.err(Some(&self.schema.id_field), "the id must be 1 to 256 bytes"));
            }
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            Some(_) => {
                return Err(self.err(
                    Some(&self.schema.id_field),
                    "the id must be a string or an integer",
                ));
            }
            None => {
                return Err(self.err(
                    Some(&self.schema.id_field),
                    "missing (every record needs an id)",
                ));
            }
        };
        if let Some(problem) = id_or_label_problem(&id) {
            return Err(self.err(Some(&self.schema.id_field), format!("the id {problem}")));
        }
        if let Some(seen) = &mut self.seen
            && !seen.insert(id.clone())
        {
            return Err(self.err(Some(&self.schema.id_field), format!("duplicate id {id:?}")));
        }
        let label = match obj.get(&self.schema.label_field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match id_or_label_problem(s) {
                None => Some(s.clone()),
                Some(problem) => {
                    return Err(self.err(
                        Some(&self.schema.label_field),
                        format!("the label {problem}"),
                    ));
                }
            },
            Some(_) => {
                return Err(self.err(Some(&self.schema.label_field), "the label must be a string"));
            }
        };
        let mut record = DataRecord {
            id,
            texts: Vec::new(),
            numerics: Vec::new(),
            label,
        };
        for (name, value) in obj {
            if name == self.schema.id_field || name == self.schema.label_field {
                continue;
            }
            let wanted = |list: &Option<Vec<String>>| {
                list.as_ref()
                    .is_none_or(|l| l.contains(&name) || l.iter().any(|f| f == EVERY_OTHER_FIELD))
            };
            let stored = match &value {
                Value::String(_) => wanted(&self.schema.text_fields),
                Value::Number(_) | Value::Array(_) => wanted(&self.schema.numeric_fields),
                _ => false,
            };
            if stored && let Some(problem) = field_name_problem(&name) {
                return Err(self.err((!name.is_empty()).then_some(name.as_str()), problem));
            }
            match value {
                Value::Null => {}
                Value::String(s) if wanted(&self.schema.text_fields) => {
                    record.texts.push(TextField { name, value: s });
                }
                Value::Number(n) if wanted(&self.schema.numeric_fields) => {
                    let v = n
                        .as_f64()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| self.err(Some(&name), "not a finite number"))?;
                    record.numerics.push(NumericField {
                        name,
                        value: Numeric::Scalar(v),
                    });
                }
                Value::Array(items) if wanted(&self.schema.numeric_fields) => {
                    let mut v = Vec::with_capacity(items.len());
                    for item in &items {
                        match item.as_f64().filter(|x| x.is_finite()) {
                            Some(x) => v.push(x),
                            None => {
                                return Err(
                                    self.err(Some(&name), "arrays must hold finite numbers only")
                                );
                            }
                        }
                    }
                    record.numerics.push(NumericField {
                        name,
                        value: Numeric::Vector(v),
                    });
                }
                Value::String(_) | Value::Number(_) | Value::Array(_) => {}
                Value::Bool(_) | Value::Object(_) => {
                    return Err(self.err(
                        Some(&name),
                        "unsupported value (use a string, a number or an array of numbers)",
                    ));
                }
            }
        }
        for (list, kind) in [
            (&self.schema.text_fields, "text"),
            (&self.schema.numeric_fields, "numeric"),
        ] {
            if let Some(list) = list {
                let present: Vec<&str> = if kind == "text" {
                    record.texts.iter().map(|t| t.name.as_str()).collect()
                } else {
                    record.numerics.iter().map(|t| t.name.as_str()).collect()
                };
                if let Some(missing) = list
                    .iter()
                    .find(|f| *f != EVERY_OTHER_FIELD && !present.contains(&f.as_str()))
                {
                    return Err(self.err(Some(missing), format!("missing {kind} field")));
                }
            }
        }
        Ok(record)
    }
}

/// A stream of records that knows where it is, for error messages.
pub trait RecordSource: Iterator<Item = Result<DataRecord, RecordError>> {
    /// The file being read.
    fn file(&self) -> &Path;
    /// The 1-based line of the record returned last.
    fn line(&self) -> u64;
}

impl<R: BufRead> RecordSource for JsonlReader<R> {
    fn file(&self) -> &Path {
        &self.file
    }
    fn line(&self) -> u64 {
        self.line_no
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<DataRecord, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            let mut limited = (&mut self.input).take(MAX_LINE_BYTES as u64 + 1);
            match limited.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(n) if n > MAX_LINE_BYTES => {
                    return Some(Err(
                        self.err(None, format!("line longer than {MAX_LINE_BYTES} bytes"))
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Some(Err(self.err(None, "not valid UTF-8")));
                }
                Err(source) => {
                    return Some(Err(RecordError::Io {
                        file: self.file.clone(),
                        source,
                    }));
                }
            }
            if self.buf.trim().is_empty() {
                continue;
            }
            // Without its terminator, so that an error at the end of the
            // line names the line's last column, not column 0 of the next.
            let line = self.buf.trim_end_matches(['\n', '\r']);
            let parsed: Result<Value, _> = serde_json::from_str(line);
            return Some(match parsed {
                Ok(Value::Object(obj)) => self.parse(obj),
                Ok(_) => Err(self.err(None, "expected a JSON object")),
                Err(e) => Err(self.err(
                    None,
                    format!(
                        "invalid JSON at column {}: {}",
                        e.column(),
                        json_problem(&e)
                    ),
                )),
            });
        }
    }
}

/// What is wrong with a line serde_json refused, in words that never
/// repeat the line's content. Malformed JSON gets serde_json's own
/// description, a fixed text ("trailing comma", "number out of range",
/// "recursion limit exceeded", …) without its position (the caller gives
/// the column); data of the wrong shape gets only that, because that
/// description quotes the values it found.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "read error".into(),
        Category::Data => "unexpected data".into(),
        Category::Eof => "unexpected end of line".into(),
        Category::Syntax => {
            let text = e.to_string();
            let what = text.rsplit_once(" at line ").map_or("", |(what, _)| what);
            if !what.is_empty()
                && what.len() <= 80
                && what.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            {
                what.to_string()
            } else {
                "syntax error".into()
            }
        }
    }
}

/// Read every record of a JSONL file (plain or gzip-compressed when the name
/// ends in `.gz`).
pub fn read_file(path: &Path, schema: Schema) -> Result<Vec<DataRecord>, RecordError> {
    open(path, schema)?.collect()
}

/// Open a JSONL file (plain or `.gz`) as a streaming reader.
pub fn open(path: &Path, schema: Schema) -> Result<JsonlReader<Box<dyn BufRead>>, RecordError> {
    let file = std::fs::File::open(path).map_err(|source| RecordError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let input: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    Ok(JsonlReader::new(path, input, schema))
}

/// A record as a JSON object (the inverse of the reader, default schema).
pub fn record_to_json(r: &DataRecord) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), Value::String(r.id.clone()));
    for t in &r.texts {
        m.insert(t.name.clone(), Value::String(t.value.clone()));
    }
    for n in &r.numerics {
        let v = match &n.value {
            Numeric::Scalar(x) => serde_json::json!(x),
            Numeric::Vector(xs) => serde_json::json!(xs),
        };
        m.insert(n.name.clone(), v);
    }
    if let Some(l) = &r.label {
        m.insert("label".into(), Value::String(l.clone()));
    }
    Value::Object(m)
}

/// Write records as JSONL.
pub fn write_records(
    out: &mut (impl Write + ?Sized),
    records: &[DataRecord],
) -> std::io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, &record_to_json(r))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Write feature rows as JSONL: `{"id", "indices", "values"}` per record.
pub fn write_features(
    out: &mut (impl Write + ?Sized),
    ids: &[&str],
    b: &SparseBatch,
) -> std::io::Result<()> {
    for (i, id) in ids.iter().enumerate() {
        let (idx, val) = b.row(i);
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({"id": id, "indices": idx, "values": val}),
        )?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Write decisions as JSONL with class names resolved.
pub fn write_decisions(
    out: &mut (impl Write + ?Sized),
    classes: &[String],
    decisions: &[Decision],
) -> std::io::Result<()> {
    for d in decisions {
        let v = match d.action {
            Action::AutoAccept(c) => {
                serde_json::json!({"id": d.id, "action": "auto-accept", "label": classes.get(c as usize), "priority": d.priority})
            }
            Action::HumanReview => {
                serde_json::json!({"id": d.id, "action": "human-review", "priority": d.priority})
            }
            Action::Skip => {
                serde_json::json!({"id": d.id, "action": "skip", "priority": d.priority})
            }
        };
        serde_json::to_writer(&mut *out, &v)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Read selector input: `{"id": ..., "models": [[p, ...], ...]}` per line.
pub fn read_prediction_sets(path: &Path) -> Result<Vec<PredictionSet>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecordError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |field: Option<&str>, problem: String| RecordError::Line {
            file: path.to_path_buf(),
            line: i as u64 + 1,
            field: field.map(str::to_string),
            problem,
        };
        let p: PredictionSet = serde_json::from_str(line).map_err(|e| {
            err(
                None,
                format!(
                    "expected {{\"id\": string, \"models\": [[number]]}}: {}",
                    json_problem(&e)
                ),
            )
        })?;
        if !seen.insert(p.id.clone()) {
            return Err(err(Some("id"), format!("duplicate id {:?}", p.id)));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<DataRecord>, RecordError> {
        JsonlReader::new("mock.jsonl", text.as_bytes(), Schema::default()).collect()
    }

    #[test]
    fn fields_by_type() -> Result<(), RecordError> {
        let r = read(
            "{\"id\": 7, \"text\": \"hi\", \"label\": \"spam\", \"pixels\": [1, 2.5], \"n\": 3}\n\n",
        )?;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, "7");
        assert_eq!(r[0].text("text"), Some("hi"));
        assert_eq!(r[0].label.as_deref(), Some("spam"));
        assert_eq!(
            r[0].numeric("pixels"),
            Some(&Numeric::Vector(vec![1.0, 2.5]))
        );
        assert_eq!(r[0].numeric("n"), Some(&Numeric::Scalar(3.0)));
        Ok(())
    }

    #[test]
    fn a_star_keeps_every_numeric_field_and_is_never_a_missing_one() -> Result<(), RecordError> {
        let schema = Schema {
            numeric_fields: Some(vec!["*".into()]),
            text_fields: Some(vec!["text".into()]),
            ..Schema::default()
        };
        let line = "{\"id\": 1, \"text\": \"hi\", \"n\": 3, \"v\": [1, 2]}\n";
        let r: Vec<DataRecord> =
            JsonlReader::new("mock.jsonl", line.as_bytes(), schema).collect::<Result<_, _>>()?;
        assert_eq!(r[0].numeric("n"), Some(&Numeric::Scalar(3.0)));
        assert_eq!(r[0].numeric("v"), Some(&Numeric::Vector(vec![1.0, 2.0])));
        assert_eq!(r[0].text("text"), Some("hi"));
        Ok(())
    }

    #[test]
    fn concatenated_gzip_files_are_read_whole() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.jsonl.gz");
        let mut bytes = Vec::new();
        for line in [
            "{\"id\": \"a\", \"text\": \"x\"}\n",
            "{\"id\": \"b\", \"text\": \"y\"}\n",
        ] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(line.as_bytes()).unwrap();
            bytes.extend(gz.finish().unwrap());
        }
        std::fs::write(&path, bytes).unwrap();
        let got = read_file(&path, Schema::default()).unwrap();
        assert_eq!(
            got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let msg = |t: &str| read(t).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            msg("{\"id\": \"a\"}\n{\"text\": \"x\"}\n"),
            "mock.jsonl:2: field `id`: missing (every record needs an id)"
        );
        assert_eq!(
            msg("{\"id\": \"a\"}\n{\"id\": \"a\"}\n"),
            "mock.jsonl:2: field `id`: duplicate id \"a\""
        );
        assert_eq!(
            msg("{\"id\": \"a\"\n"),
            "mock.jsonl:1: invalid JSON at column 10: unexpected end of line"
        );
        assert_eq!(
            msg("{\"id\": \"a\",, \"b\": 1}\r\n"),
            "mock.jsonl:1: invalid JSON at column 12: key must be a string"
        );
        assert_eq!(
            msg("{\"id\": \"a\", \"n\": 1e999}\n"),
            "mock.jsonl:1: invalid JSON at column 22: number out of range"
        );
        let deep = format!(
            "{{\"id\": \"a\", \"n\": {}{}}}\n",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            msg(&deep),
            "mock.jsonl:1: invalid JSON at column 144: recursion limit exceeded"
        );
        assert_eq!(
            msg("{\"id\": \"a\", \"t\": \"secret\" \"more\"}\n"),
            "mock.jsonl:1: invalid JSON at column 27: expected `,` or `}`"
        );
        assert_eq!(
            msg("{\"id\": \"a\", \"ok\": true}\n"),
            "mock.jsonl:1: field `ok`: unsupported value (use a string, a number or an array of numbers)"
        );
        assert_eq!(msg("[1]\n"), "mock.jsonl:1: expected a JSON object");
        assert_eq!(
            msg("{\"id\": \"a\", \"v\": [1, \"x\"]}\n"),
            "mock.jsonl:1: field `v`: arrays must hold finite numbers only"
        );
    }
}
