//! `cloister dataset …`: import, list, statistics. There is no command that
//! prints rows; `export` exists only to be denied and audited.

use crate::output::say;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use cloister_host::csv_records::{NumberCell, number_cell};
use cloister_host::datasets::DatasetVersion;
use cloister_host::records::Schema;
use cloister_host::service::ImportOptions;

use crate::session::EnvArgs;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Import a JSONL or CSV file (optionally .gz) as the next version of
    /// dataset NAME. All or nothing: any bad line aborts the import.
    Import {
        /// Dataset name.
        name: String,
        /// The file.
        file: PathBuf,
        /// jsonl or csv (default: by extension).
        #[arg(long)]
        format: Option<String>,
        /// The id field.
        #[arg(long, default_value = "id")]
        id_field: String,
        /// The label field (absent, null or empty: unlabeled).
        #[arg(long, default_value = "label")]
        label_field: String,
        /// Text fields to keep (repeatable; default: every string field).
        #[arg(long = "text-field")]
        text_fields: Vec<String>,
        /// Numeric fields to keep (repeatable; JSONL default: every numeric
        /// field; CSV: none). `*` keeps every field not listed as text: for
        /// a numeric CSV, every column but the id and the label.
        #[arg(long = "numeric-field")]
        numeric_fields: Vec<String>,
    },
    /// List datasets and their versions.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Aggregate statistics of NAME or NAME@VERSION. Never rows.
    Stats {
        /// NAME or NAME@VERSION.
        dataset: String,
        /// Also count the train/validation/test split for this seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export rows. Always denied by policy (and audited): raw data never
    /// leaves the environment.
    Export {
        /// NAME or NAME@VERSION.
        dataset: String,
    },
}

/// Rows of the user's own file [`numeric_columns_note`] reads.
const NOTE_ROWS: usize = 10_000;

/// After a CSV import with no numeric fields named: which columns held
/// only numbers (in the first [`NOTE_ROWS`] rows of the user's own file,
/// read again here, once, outside the environment) and so went in as text,
/// with the flags that import them as numbers. `None` for JSONL (whose
/// numbers are numbers), or when no column is all numbers.
fn numeric_columns_note(
    file: &std::path::Path,
    format: Option<&str>,
    schema: Schema,
) -> Option<String> {
    let csv = match format {
        Some(f) => f == "csv",
        None => {
            let name = file.to_string_lossy().to_lowercase();
            name.ends_with(".csv") || name.ends_with(".csv.gz")
        }
    };
    if !csv {
        return None;
    }
    // Listed text columns are text by choice, and leave the rest out;
    // without a list every column went in as text.
    let listed = schema.text_fields.clone();
    let every_column = Schema {
        text_fields: None,
        numeric_fields: None,
        ..schema
    };
    let source = cloister_host::datasets::open_source(file, Some("csv"), every_column).ok()?;
    // Per column in file order: whether every non-empty cell so far is a
    // number as the importer reads numbers (`None`: no non-empty cell yet).
    let mut columns: Vec<(String, Option<bool>)> = Vec::new();
    let mut rows = 0;
    for record in source.take(NOTE_ROWS) {
        rows += 1;
        // A row the importer refuses for another reason: no note.
        let record = record.ok()?;
        for (j, field) in record.texts.into_iter().enumerate() {
            // Every row has the same columns in the same order.
            if columns.get(j).is_none_or(|c| c.0 != field.name) {
                columns.insert(j, (field.name.clone(), None));
            }
            let column = &mut columns[j].1;
            match number_cell(&field.value) {
                NumberCell::Empty => {}
                NumberCell::Number(_) => *column = Some(column.unwrap_or(true)),
                NumberCell::NotANumber => *column = Some(false),
            }
        }
    }
    let numeric: Vec<&str> = columns
        .iter()
        .filter(|(name, all)| {
            *all == Some(true) && listed.as_ref().is_none_or(|l| !l.contains(name))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    if numeric.is_empty() {
        return None;
    }
    let shown = &numeric[..numeric.len().min(5)];
    let more = numeric.len() - shown.len();
    let flags: String = listed
        .iter()
        .flatten()
        .map(|t| format!(" --text-field {t}"))
        .collect();
    Some(format!(
        "note: {} column{} held only numbers{} and {}: {}{}.\n  \
         To import them as numbers, import again with --numeric-field '*'{flags}",
        numeric.len(),
        if numeric.len() == 1 { "" } else { "s" },
        if rows == NOTE_ROWS {
            format!(" (in the first {NOTE_ROWS} rows)")
        } else {
            String::new()
        },
        if listed.is_some() {
            "were left out"
        } else {
            "went in as text"
        },
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
    ))
}

pub fn run(env: &EnvArgs, cmd: DatasetCommand) -> Result<ExitCode> {
    let s = if matches!(
        cmd,
        DatasetCommand::List { .. } | DatasetCommand::Stats { .. }
    ) {
        env.reading_session()?
    } else {
        env.session()?
    };
    match cmd {
        DatasetCommand::Import {
            name,
            file,
            format,
            id_field,
            label_field,
            text_fields,
            numeric_fields,
        } => {
            let schema = Schema {
                id_field,
                label_field,
                text_fields: (!text_fields.is_empty()).then_some(text_fields),
                numeric_fields: (!numeric_fields.is_empty()).then_some(numeric_fields),
            };
            let numbers_as_text = schema.numeric_fields.is_none();
            let (format_given, schema_given) = (format.clone(), schema.clone());
            let started = std::time::Instant::now();
            let v = s.cloister.import_dataset(
                &s.user,
                &name,
                &file,
                &ImportOptions { format, schema },
            )?;
            say!(
                "imported {} records as {} in {:.1} s (sha256 {})",
                v.stats.records,
                v.reference(),
                started.elapsed().as_secs_f64(),
                v.digest
            );
            say!(
                "  labeled {}, unlabeled {}",
                v.stats.labeled,
                v.stats.unlabeled
            );
            if numbers_as_text
                && let Some(note) =
                    numeric_columns_note(&file, format_given.as_deref(), schema_given)
            {
                say!("{note}");
            }
        }
        DatasetCommand::List { json } => {
            let all = s.cloister.list_datasets(&s.user)?;
            if json {
                let rows: Vec<_> = all.iter().map(summary_json).collect();
                crate::output::json(&serde_json::to_string_pretty(&rows)?);
            } else if all.is_empty() {
                say!("no datasets (import one with `cloister dataset import NAME FILE`)");
            } else {
                say!(
                    "{:<24} {:>7} {:>10} {:>10}  {:<24} sha256",
                    "dataset",
                    "version",
                    "records",
                    "labeled",
                    "imported"
                );
                for v in &all {
                    say!(
                        "{:<24} {:>7} {:>10} {:>10}  {:<24} {}",
                        v.name,
                        v.version,
                        v.stats.records,
                        v.stats.labeled,
                        cloister_host::time::rfc3339(v.created_ms),
                        &v.digest[..16]
                    );
                }
            }
        }
        DatasetCommand::Stats {
            dataset,
            seed,
            json,
        } => {
            let (v, splits) = s.cloister.dataset_stats(&s.user, &dataset, seed)?;
            if json {
                let mut j = summary_json(&v);
                j["stats"] = serde_json::to_value(&v.stats)?;
                if let Some(sp) = &splits {
                    j["splits"] = serde_json::to_value(sp)?;
                }
                crate::output::json(&serde_json::to_string_pretty(&j)?);
            } else {
                print_stats(&v);
                if let Some(sp) = splits {
                    say!("splits (seed {}):        labeled  unlabeled", sp.seed);
                    for (split, (l, u)) in &sp.counts {
                        say!(
                            "  {:<20} {:>9} {:>10}",
                            format!("{split:?}").to_lowercase(),
                            l,
                            u
                        );
                    }
                }
            }
        }
        DatasetCommand::Export { dataset } => {
            s.cloister.export_dataset(&s.user, &dataset)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn summary_json(v: &DatasetVersion) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "version": v.version,
        "digest": v.digest,
        "records": v.stats.records,
        "labeled": v.stats.labeled,
        "unlabeled": v.stats.unlabeled,
        "source": v.source,
        "created_by": v.created_by,
        "created": cloister_host::time::rfc3339(v.created_ms),
    })
}

fn print_stats(v: &DatasetVersion) {
    let st = &v.stats;
    say!("{} (sha256 {})", v.reference(), v.digest);
    say!(
        "imported {} by {} from {}",
        cloister_host::time::rfc3339(v.created_ms),
        v.created_by,
        v.source
    );
    say!(
        "records {}   labeled {}   unlabeled {}",
        st.records,
        st.labeled,
        st.unlabeled
    );
    say!("labels:");
    for (label, n) in &st.labels {
        say!(
            "  {:<30} {:>9} {:>6.1}%",
            label,
            n,
            100.0 * *n as f64 / st.labeled.max(1) as f64
        );
    }
    say!("fields:");
    for (name, f) in &st.fields {
        say!(
            "  {:<30} {:<8} {:>6.1}% present",
            name,
            f.kind,
            100.0 * f.present as f64 / st.records.max(1) as f64
        );
    }
    let tl = &st.text_length;
    say!(
        "text length (characters): min {} mean {:.0} max {}",
        tl.min,
        tl.mean,
        tl.max
    );
    let peak = tl.buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1);
    let mut lower = 0;
    for (upper, n) in &tl.buckets {
        let bar = "#".repeat((40 * n).div_ceil(peak) as usize);
        say!("  [{:>7}, {:>7}) {:>9} {}", lower, upper, n, bar);
        lower = *upper;
    }
}
