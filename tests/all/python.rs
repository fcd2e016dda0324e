//! Plugins written in Python: a componentize-py component of the
//! `preprocessor` world, built from `plugins/python/lowercase`, loads and
//! runs in the same sandbox as the Rust plugins.
//!
//! Building needs `componentize-py` (PyPI). `.ci/run` installs it and sets
//! `CLOISTER_REQUIRE_PYTHON=1`, so there the test fails if it is missing;
//! elsewhere it says it skipped.

use std::path::Path;
use std::process::Command;

use cloister_host::runtime::{Limits, Runtime, RuntimeConfig};

use crate::support::text;

/// Builds `plugins/python/NAME/app.py` against `world`; `None` when
/// componentize-py is not installed.
fn build(name: &str, world: &str, out: &Path) -> Option<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wit = root.join("plugin-sdk/wit");
    // Built from a copy, so that nothing the build writes (bytecode
    // caches) lands in the source tree.
    let src = out.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        root.join("plugins/python").join(name).join("app.py"),
        src.join("app.py"),
    )
    .unwrap();
    let status = Command::new("componentize-py")
        .arg("-d")
        .arg(&wit)
        .args(["-w", world, "componentize", "--stub-wasi", "app", "-o"])
        .arg(out)
        .current_dir(&src)
        .status();
    match status {
        Ok(s) => {
            assert!(s.success(), "componentize-py failed on {name}");
            Some(std::fs::read(out).unwrap())
        }
        Err(_) => {
            assert!(
                std::env::var_os("CLOISTER_REQUIRE_PYTHON").is_none(),
                "componentize-py is required (pip install componentize-py==0.25.1)"
            );
            eprintln!("SKIPPED: componentize-py is not installed");
            None
        }
    }
}

#[test]
fn a_componentize_py_preprocessor_runs_in_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bytes) = build("lowercase", "preprocessor", &dir.path().join("lc.wasm")) else {
        return;
    };
    // Its own runtime: the component's many core instances (CPython, its
    // libc, the stubs) are what the pooling limits must admit.
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let inspection = rt.inspect(&bytes);
    assert!(inspection.verdict.is_ok(), "{:?}", inspection.verdict);
    // `--stub-wasi`: nothing imported but the plugin types.
    assert_eq!(inspection.imports, ["cloister:plugin/types@0.1.0"]);
    let p = rt.load(&bytes).unwrap();
    assert_eq!(p.metadata.name, "py-lowercase");
    let out = p
        .runner(&rt, &[], Limits::default())
        .unwrap()
        .preprocess(&[text("a", "Hello WORLD"), text("b", "MiXeD Case")])
        .unwrap();
    let texts: Vec<&str> = out.iter().map(|r| r.texts[0].value.as_str()).collect();
    assert_eq!(texts, ["hello world", "mixed case"]);
}
