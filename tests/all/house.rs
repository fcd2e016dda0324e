//! The walls of the house, held against the manifests: which crate may
//! depend on which. A dependency against the layering fails here (and the
//! code that would use it fails to compile, since a crate can only call
//! what it depends on).

use std::collections::BTreeMap;
use std::path::Path;

/// Every workspace member's name → the names of its normal dependencies.
fn graph() -> BTreeMap<String, Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ws: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let members = ws["workspace"]["members"].as_array().unwrap();
    let mut out = BTreeMap::new();
    for m in members {
        let dir = root.join(m.as_str().unwrap());
        let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let name = manifest["package"]["name"].as_str().unwrap().to_string();
        let deps = manifest
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        out.insert(name, deps);
    }
    out
}

fn who_depends_on(g: &BTreeMap<String, Vec<String>>, dep: &str) -> Vec<String> {
    g.iter()
        .filter(|(_, deps)| deps.iter().any(|d| d == dep))
        .map(|(n, _)| n.clone())
        .collect()
}

#[test]
fn each_engine_has_exactly_one_crate_that_may_touch_it() {
    let g = graph();
    assert!(g.contains_key("cloister-runtime"), "{g:?}");
    for engine in ["wasmtime-wasi", "wasmtime-wasi-io"] {
        assert_eq!(who_depends_on(&g, engine), ["cloister-runtime"], "{engine}");
    }
    // cloister-types carries wasmtime only as an optional dependency, for
    // the derives that the runtime alone switches on.
    assert_eq!(
        who_depends_on(&g, "wasmtime"),
        ["cloister-runtime", "cloister-types"]
    );
    assert_eq!(who_depends_on(&g, "sled"), ["cloister-store"]);
    assert_eq!(who_depends_on(&g, "candle-core"), ["cloister-train"]);
    assert_eq!(who_depends_on(&g, "cedar-policy"), ["cloister-host"]);
}

#[test]
fn the_walls_depend_on_types_alone_and_the_edges_on_the_service() {
    let g = graph();
    let ours = |n: &str| -> Vec<String> {
        g[n].iter()
            .filter(|d| d.starts_with("cloister-"))
            .cloned()
            .collect()
    };
    for wall in ["cloister-runtime", "cloister-train", "cloister-store"] {
        assert_eq!(ours(wall), ["cloister-types"], "{wall}");
    }
    assert!(ours("cloister-types").is_empty());
    // The CLI and the console reach the walls only through the service.
    for edge in ["cloister", "cloister-console"] {
        for wall in [
            "cloister-runtime",
            "cloister-train",
            "cloister-store",
            "cloister-types",
        ] {
            assert!(!ours(edge).contains(&wall.to_string()), "{edge} -> {wall}");
        }
    }
}
