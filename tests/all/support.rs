//! Shared helpers.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
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

/// A scratch directory for a fixture that lives as long as the test
/// binary. Statics are never dropped, so a plain `TempDir` held by one would
/// stay on disk after every run: these live under
/// `$TMPDIR/cloister-test-fixtures/PID/`, and the first call of a run removes
/// the directories of runs whose process is gone.
pub fn fixture_dir() -> tempfile::TempDir {
    static ROOT: OnceLock<std::path::PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let base = std::env::temp_dir().join("cloister-test-fixtures");
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let gone = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
                if gone {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let mine = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&mine).expect("fixture directory");
        mine
    });
    tempfile::tempdir_in(root).expect("fixture directory")
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
/// The outcome of every plugin stage audited in `c`, oldest first, read
/// as `admin`.
pub fn plugin_calls(
    c: &cloister_host::service::Cloister,
    admin: &cloister_host::users::User,
) -> Vec<cloister_host::audit::PluginOutcome> {
    c.audit_log(
        admin,
        &cloister_host::audit::AuditFilter {
            action: Some("plugin_call".into()),
            ..Default::default()
        },
    )
    .unwrap()
    .into_iter()
    .filter_map(|e| e.record.outcome)
    .collect()
}

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

/// A raw HTTP/1.1 exchange: (status, headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or(b"");
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    // Read the head, then exactly the body (a peer may keep the connection
    // open whatever `Connection: close` says).
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let split = loop {
        if let Some(p) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        out.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = out[split + 4..].to_vec();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(len) = length {
        while body.len() < len {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed inside the body");
            body.extend_from_slice(&buf[..n]);
        }
        body.truncate(len);
    } else {
        loop {
            if lower.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n") {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading a response: {e}"),
            }
        }
        if lower.contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
    }
    (status, head, body)
}

/// A port free on the loopback interface right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

/// Asserts that every entry of `c`'s audit log names an action Cloister
/// knows it records (a policy action or one of `audit::events`), so that
/// `audit log --action` never refuses a name the log holds and the
/// console suggests every name it does.
pub fn every_audited_action_is_known(c: &cloister_host::service::Cloister) {
    let known = cloister_host::service::audited_actions();
    let entries = c
        .env()
        .audit()
        .query(&cloister_host::audit::AuditFilter::default())
        .unwrap();
    assert!(!entries.is_empty());
    for e in entries {
        assert!(
            known.contains(&e.record.action.as_str()),
            "entry {} records `{}`, which is not in service::audited_actions",
            e.seq,
            e.record.action
        );
    }
}
