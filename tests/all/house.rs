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

/// The host's own source files, `(path under host/src, text without
/// comments and without its test module)`.
fn host_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap_or("");
            let code: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            (rel, code)
        })
        .collect()
}

#[test]
fn every_operation_has_its_home_in_the_service_folder() {
    let sources = host_sources();
    let outside: Vec<&String> = sources
        .iter()
        .filter(|(p, code)| !p.starts_with("service/") && code.contains("impl Cloister"))
        .map(|(p, _)| p)
        .collect();
    assert!(
        outside.is_empty(),
        "impl Cloister outside service/: {outside:?}"
    );
    // One file per domain, each a block of operations.
    for domain in [
        "users", "datasets", "plugins", "training", "models", "jobs", "labeling", "audit", "policy",
    ] {
        let (_, code) = sources
            .iter()
            .find(|(p, _)| *p == format!("service/{domain}.rs"))
            .unwrap_or_else(|| panic!("no service/{domain}.rs"));
        assert!(code.contains("impl Cloister"), "service/{domain}.rs");
    }
}

#[test]
fn the_host_modules_form_no_circle_and_only_the_service_sits_on_top() {
    // Module → the modules of this crate its code names (`crate::x`).
    let mut g: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (path, code) in host_sources() {
        let module = path.split(['/', '.']).next().unwrap().to_string();
        if module == "lib" {
            continue;
        }
        let deps = g.entry(module.clone()).or_default();
        for part in code.split("crate::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    for (m, deps) in &g {
        assert!(
            m == "service" || !deps.contains("service"),
            "{m} reaches up into the service"
        );
    }
    // Depth-first search for a back edge.
    fn visit(
        g: &BTreeMap<String, std::collections::BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("import circle: {} -> {m}", path[i..].join(" -> "));
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            visit(g, d, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = std::collections::BTreeSet::new();
    for m in g.keys() {
        visit(&g, m, &mut Vec::new(), &mut done);
    }
    assert!(g["env"].iter().all(|d| d != "datasets"), "{:?}", g["env"]);
}

#[test]
fn the_cli_and_the_console_build_against_the_sealed_service() {
    // `testing` opens the store and the audit log to integration tests and
    // benchmarks; the product's own crates must not switch it on (CI also
    // builds them alone, so code there that needs it does not compile).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["cli", "console"] {
        let manifest: toml::Table = std::fs::read_to_string(root.join(krate).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let dep = &manifest["dependencies"]["cloister-host"];
        let features = dep
            .get("features")
            .and_then(|f| f.as_array())
            .cloned()
            .unwrap_or_default();
        assert!(
            !features.iter().any(|f| f.as_str() == Some("testing")),
            "{krate} enables cloister-host/testing"
        );
    }
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.contains("cargo check -j2 -p cloister-console -p cloister --lib --bins"),
        "CI builds the edges without the testing feature"
    );
}
