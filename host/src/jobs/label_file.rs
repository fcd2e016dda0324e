//! Label files: JSON lines or CSV, every error naming the line and field.

use super::JobError;

/// One entry of a label file: (line, record id, label, job).
pub(crate) type LabelLine = (usize, String, String, Option<String>);

/// Parses a label file: `(line, record id, label, job)`.
pub(crate) fn parse_label_file(file: &str, text: &str) -> Result<Vec<LabelLine>, JobError> {
    let err = |line: usize, message: String| JobError::LabelFile {
        file: file.to_string(),
        line,
        message,
    };
    let mut out = Vec::new();
    let is_csv = file.to_ascii_lowercase().ends_with(".csv");
    if is_csv {
        // RFC 4180 through the csv crate: quoted fields may hold commas,
        // quotes and newlines; errors name the line the record starts on.
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(text.as_bytes());
        let line_of = |e: &csv::Error| {
            e.position()
                .map_or(1, |p| usize::try_from(p.line()).unwrap_or(usize::MAX))
        };
        let cols: Vec<String> = reader
            .headers()
            .map_err(|e| err(line_of(&e), format!("unreadable header: {e}")))?
            .iter()
            .map(str::to_string)
            .collect();
        if cols.iter().all(String::is_empty) {
            return Err(err(
                1,
                "empty file: expected a header with `id` and `label`".into(),
            ));
        }
        let find = |name: &str| {
            cols.iter()
                .position(|c| c == name)
                .ok_or_else(|| err(1, format!("the header has no `{name}` column")))
        };
        let (ci, cl) = (find("id")?, find("label")?);
        let cj = cols.iter().position(|c| c == "job");
        for record in reader.records() {
            let record = record.map_err(|e| err(line_of(&e), format!("unreadable CSV: {e}")))?;
            let n = record
                .position()
                .map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
            if record.iter().all(str::is_empty) {
                continue;
            }
            let get = |c: usize, name: &str| {
                record
                    .get(c)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| err(n, format!("field `{name}` is missing")))
            };
            out.push((
                n,
                get(ci, "id")?,
                get(cl, "label")?,
                cj.and_then(|c| record.get(c).filter(|v| !v.is_empty()).map(str::to_string)),
            ));
        }
    } else {
        for (n, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| err(n + 1, format!("not a JSON object: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| err(n + 1, "not a JSON object".into()))?;
            let get = |name: &str| -> Result<Option<String>, JobError> {
                match obj.get(name) {
                    None => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(err(n + 1, format!("field `{name}` must be a string"))),
                }
            };
            for k in obj.keys() {
                if !["id", "label", "job"].contains(&k.as_str()) {
                    return Err(err(n + 1, format!("unknown field `{k}`")));
                }
            }
            let id = get("id")?.ok_or_else(|| err(n + 1, "field `id` is missing".into()))?;
            let label =
                get("label")?.ok_or_else(|| err(n + 1, "field `label` is missing".into()))?;
            out.push((n + 1, id, label, get("job")?));
        }
    }
    if out.is_empty() {
        return Err(err(1, "no labels in the file".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_files_name_the_line_and_field() {
        let ok = "{\"id\":\"a\",\"label\":\"spam\"}\n\n{\"id\":\"b\",\"label\":\"ham\",\"job\":\"j-1\"}\n";
        let got = parse_label_file("l.jsonl", ok).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], (3, "b".into(), "ham".into(), Some("j-1".into())));
        let e = parse_label_file("l.jsonl", "{\"id\":\"a\"}\n").unwrap_err();
        assert_eq!(e.to_string(), "l.jsonl:1: field `label` is missing");
        let e = parse_label_file("l.jsonl", "{\"id\":\"a\",\"label\":1}\n").unwrap_err();
        assert!(e.to_string().contains("`label` must be a string"), "{e}");
        let e = parse_label_file("l.csv", "id,label\na,spam\nb\n").unwrap_err();
        assert_eq!(e.to_string(), "l.csv:3: field `label` is missing");
        // Quoted fields keep their commas (and quotes); lines are the
        // record's first line.
        let ok = parse_label_file(
            "q.csv",
            "id,label\n\"a,1\",\"spam, really\"\n\"b\"\"2\",ham\n",
        )
        .expect("quoted CSV");
        assert_eq!(
            ok,
            vec![
                (2, "a,1".to_string(), "spam, really".to_string(), None),
                (3, "b\"2".to_string(), "ham".to_string(), None)
            ]
        );
        let e = parse_label_file("l.csv", "record,label\n").unwrap_err();
        assert!(e.to_string().contains("no `id` column"), "{e}");
        assert_eq!(
            parse_label_file("l.csv", "id,label\na,x\n").unwrap().len(),
            1
        );
    }
}
