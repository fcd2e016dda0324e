//! Shared helpers.

use std::sync::OnceLock;
use std::time::Duration;

use cloister_host::runtime::{
    CallStage, Limits, LoadedPlugin, Runtime, RuntimeConfig, RuntimeError,
};
use cloister_host::types::ErrorCode;
use cloister_host::types::{DataRecord, Numeric, NumericField, TextField};

/// One runtime (engine, pool, epoch thread) shared by the tests of a module.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Runtime::new(RuntimeConfig::default()).expect("runtime"))
}

/// A runtime without fuel metering (wall-clock timeout only).
pub fn runtime_without_fuel() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Runtime::new(RuntimeConfig {
            fuel: false,
            max_instances: 8,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

pub fn load(bytes: &[u8]) -> LoadedPlugin {
    runtime().load(bytes).expect("plugin loads")
}

pub fn bundled(name: &str) -> LoadedPlugin {
    load(cloister_bundled_plugins::get(name).expect("bundled plugin"))
}

pub fn cfg(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn text(id: &str, text: &str) -> DataRecord {
    DataRecord {
        id: id.into(),
        texts: vec![TextField {
            name: "text".into(),
            value: text.into(),
        }],
        numerics: vec![],
        label: None,
    }
}

pub fn numeric(id: &str, name: &str, values: &[f64]) -> DataRecord {
    DataRecord {
        id: id.into(),
        texts: vec![],
        numerics: vec![NumericField {
            name: name.into(),
            value: Numeric::Vector(values.to_vec()),
        }],
        label: None,
    }
}

/// Limits that make attacks end quickly.
pub fn tight() -> Limits {
    Limits {
        fuel: 300_000_000,
        memory_bytes: 64 * 1024 * 1024,
        output_bytes: 1024 * 1024,
        timeout: Duration::from_secs(10),
        log_bytes: 16 * 1024,
        ..Limits::default()
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<T, RuntimeError>) -> &'static str {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

/// The bundled SpamAssassin records (labels included).
pub fn spamassassin() -> Vec<DataRecord> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/spamassassin/spamassassin.jsonl.gz");
    cloister_host::records::read_file(&path, Default::default()).expect("bundled data")
}

/// The stage, code and key of a plugin's own error (the code and key are
/// sealed: read here as the administrators' log would).
pub fn plugin_error<T: std::fmt::Debug>(
    r: Result<T, RuntimeError>,
) -> (CallStage, ErrorCode, Option<String>) {
    match r {
        Err(RuntimeError::Plugin { stage, code, key }) => {
            (stage, *code.for_admin_log(), key.for_admin_log().clone())
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
}
