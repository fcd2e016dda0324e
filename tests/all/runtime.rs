//! Loading, inspection and the compiled-artifact cache.

use cloister_host::runtime::{ArtifactCache, Runtime, RuntimeConfig, RuntimeError};

use crate::support::*;

fn disk_runtime(dir: &std::path::Path, secret: &[u8]) -> Runtime {
    limited_runtime(dir, secret, u64::MAX)
}

fn limited_runtime(dir: &std::path::Path, secret: &[u8], limit: u64) -> Runtime {
    let handle = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority()).unwrap();
    Runtime::new(RuntimeConfig {
        max_instances: 4,
        cache: ArtifactCache::on_disk(handle, secret, limit),
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// The disk tier holds at most its limit: past it, the artifacts used
/// least recently go (a hit counts as a use), and with a limit of 0
/// nothing is written.
#[test]
fn the_artifact_cache_on_disk_keeps_what_was_used_last_within_its_limit() {
    let secret = [3u8; 32];
    let [a, b, c] = ["entropy", "hashed-ngrams", "text-normalize"]
        .map(|name| cloister_bundled_plugins::get(name).unwrap());
    // Each artifact's size, from a cache without a limit.
    let size = |bytes: &[u8]| {
        let d = tempfile::tempdir().unwrap();
        disk_runtime(d.path(), &secret).load(bytes).unwrap();
        dir_bytes(d.path())
    };
    let limit = size(a) + size(b) + size(c) - 1;
    let dir = tempfile::tempdir().unwrap();
    let pause = || std::thread::sleep(std::time::Duration::from_millis(20));
    let first = limited_runtime(dir.path(), &secret, limit);
    first.load(a).unwrap();
    pause();
    first.load(b).unwrap();
    pause();
    // A new process: `a` from disk (a use), then `c` compiled, which
    // leaves room for two: `b`, used least recently, goes.
    let second = limited_runtime(dir.path(), &secret, limit);
    second.load(a).unwrap();
    assert_eq!(second.config().cache.stats(), (1, 0));
    pause();
    second.load(c).unwrap();
    assert!(dir_bytes(dir.path()) <= limit);
    let third = limited_runtime(dir.path(), &secret, limit);
    third.load(a).unwrap();
    third.load(c).unwrap();
    assert_eq!(third.config().cache.stats(), (2, 0), "a and c were kept");
    third.load(b).unwrap();
    assert_eq!(third.config().cache.stats(), (2, 1), "b was not");

    let none = tempfile::tempdir().unwrap();
    let rt = limited_runtime(none.path(), &secret, 0);
    rt.load(a).unwrap();
    assert_eq!(std::fs::read_dir(none.path()).unwrap().count(), 0);
}

#[test]
fn compiled_artifacts_are_cached_authenticated_and_tamper_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = cloister_bundled_plugins::get("entropy").unwrap();
    let secret = [7u8; 32];

    let first = disk_runtime(dir.path(), &secret);
    first.load(bytes).unwrap();
    assert_eq!(first.config().cache.stats(), (0, 1), "cold: compiled");
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);

    let second = disk_runtime(dir.path(), &secret);
    second.load(bytes).unwrap();
    assert_eq!(
        second.config().cache.stats(),
        (1, 0),
        "warm: loaded from disk"
    );

    // A flipped byte: the tag no longer verifies, the file is ignored.
    let mut artifact = std::fs::read(&files[0]).unwrap();
    let last = artifact.len() - 1;
    artifact[last] ^= 0x55;
    std::fs::write(&files[0], &artifact).unwrap();
    let third = disk_runtime(dir.path(), &secret);
    third.load(bytes).unwrap();
    assert_eq!(third.config().cache.stats(), (0, 1), "tampered: recompiled");

    // Another environment's secret cannot vouch for this one's artifacts.
    let fourth = disk_runtime(dir.path(), &[8u8; 32]);
    fourth.load(bytes).unwrap();
    assert_eq!(fourth.config().cache.stats(), (0, 1));
}

#[test]
fn a_precompiled_artifact_is_never_accepted_as_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let rt = disk_runtime(dir.path(), &[1u8; 32]);
    rt.load(cloister_bundled_plugins::get("entropy").unwrap())
        .unwrap();
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let artifact = std::fs::read(file).unwrap();
    assert!(matches!(
        rt.load(&artifact[32..]),
        Err(RuntimeError::NotAComponent(_))
    ));
}

#[test]
fn inspect_reports_identity_metadata_and_imports() {
    let bytes = cloister_bundled_plugins::get("hashed-ngrams").unwrap();
    let report = runtime().inspect(bytes);
    assert!(report.verdict.is_ok());
    assert_eq!(report.digest, cloister_host::Digest::of(bytes));
    let m = report.metadata.unwrap();
    assert_eq!(m.name, "hashed-ngrams");
    assert!(
        m.config
            .iter()
            .any(|k| k.name == "bits" && k.default_value == "18")
    );
    assert!(
        report
            .imports
            .iter()
            .any(|i| i.starts_with("wasi:cli/stderr@0.2"))
    );
    assert!(
        report
            .exports
            .iter()
            .any(|e| e.starts_with("cloister:plugin/featurize@0.1"))
    );

    let report = runtime().inspect(cloister_test_plugins::HOSTILE_NET);
    assert_eq!(report.verdict.unwrap_err().code(), "forbidden-imports");
    assert!(report.metadata.is_none());
}

#[test]
fn garbage_empty_and_core_modules_get_one_line_errors() {
    for (bytes, expect) in [
        (&b""[..], "the file is empty"),
        (
            &b"MZ\x90\x00 not wasm at all"[..],
            "the file is not WebAssembly",
        ),
        (&b"\0asm\x01\0\0\0"[..], "core WebAssembly module"),
        (&b"\0asm\x0d\0\x01\0garbage"[..], "invalid"),
    ] {
        let e = runtime().load(bytes).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(expect), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn every_bundled_plugin_loads_with_valid_metadata() {
    for (name, bytes) in cloister_bundled_plugins::ALL {
        let p = runtime().load(bytes).unwrap();
        assert_eq!(p.metadata.name, *name);
        assert_eq!(p.metadata.kind, p.kind);
        assert_eq!(p.metadata.version, "0.1.0");
    }
}

#[test]
fn instantiation_is_cheap_and_repeatable() {
    let p = bundled("entropy");
    for _ in 0..200 {
        let inst = p.instantiate(runtime(), &[], &Default::default()).unwrap();
        drop(inst);
    }
}
