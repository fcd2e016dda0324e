//! `cloister plugin build`: a Python plugin into a WebAssembly component.
//!
//! The build runs `componentize-py` (PyPI) against Cloister's interface
//! with `--stub-wasi`, in a scratch directory holding three things this
//! binary carries or copies: the WIT (`plugin-sdk/wit/plugin.wit`), the
//! Python SDK (`plugin-sdk/python/cloister_plugin`) and the plugin's own
//! `.py` files. Nothing is written next to the sources. The result is
//! inspected by the same runtime that will run it — refused components,
//! and components of another kind than the world asked for, are not
//! written — and then moved into place in one rename.
//!
//! This runs on a plugin author's machine, over the author's own code; it
//! opens no environment and touches no data.

use crate::output::{say, tell};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use cloister_host::runtime::{Runtime, RuntimeConfig};
use cloister_host::types::PluginKind;

/// The interface every plugin is built against.
const WIT: &str = include_str!("../../plugin-sdk/wit/plugin.wit");
/// The Python SDK, one module.
const SDK: &str = include_str!("../../plugin-sdk/python/cloister_plugin/__init__.py");
/// The componentize-py release the SDK and the tests use.
pub const COMPONENTIZE_PY: &str = "0.25.1";

/// The plugin worlds of the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum World {
    Preprocessor,
    Featurizer,
    FittedFeaturizer,
    Selector,
}

impl World {
    fn wit_name(self) -> &'static str {
        match self {
            World::Preprocessor => "preprocessor",
            World::Featurizer => "featurizer",
            World::FittedFeaturizer => "fitted-featurizer",
            World::Selector => "selector",
        }
    }

    fn kind(self) -> PluginKind {
        match self {
            World::Preprocessor => PluginKind::Preprocessor,
            World::Featurizer | World::FittedFeaturizer => PluginKind::Featurizer,
            World::Selector => PluginKind::Selector,
        }
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The plugin: a directory holding `app.py` (and any modules it
    /// imports), or one `.py` file.
    source: PathBuf,
    /// The interface world the plugin implements: the SDK base class it
    /// derives from (`FittedFeaturizer` is `fitted-featurizer`).
    #[arg(long, value_enum)]
    world: World,
    /// Where to write the component (default: `<name>.wasm` in the current
    /// directory, `<name>` being the directory's or the file's name).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The componentize-py executable.
    #[arg(
        long,
        env = "CLOISTER_COMPONENTIZE_PY",
        default_value = "componentize-py"
    )]
    componentize_py: PathBuf,
}

pub fn build(args: BuildArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let meta = std::fs::metadata(&args.source)
        .with_context(|| format!("cannot read {}", args.source.display()))?;
    let (dir, module) = if meta.is_dir() {
        if !args.source.join("app.py").is_file() {
            bail!(
                "{}: no app.py in this directory (the module componentize-py builds)",
                args.source.display()
            );
        }
        (args.source.clone(), "app".to_string())
    } else {
        let module = match (
            args.source.extension().and_then(|e| e.to_str()),
            args.source.file_stem().and_then(|s| s.to_str()),
        ) {
            (Some("py"), Some(stem)) if is_module_name(stem) => stem.to_string(),
            _ => bail!(
                "{}: not a Python module (a .py file whose name is an identifier)",
                args.source.display()
            ),
        };
        let dir = args
            .source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        (dir, module)
    };
    let name = if module == "app" {
        std::fs::canonicalize(&dir)
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "plugin".into())
    } else {
        module.clone()
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.wasm")));

    check_version(&args.componentize_py)?;

    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let wit = scratch.path().join("wit");
    let sdk = scratch.path().join("sdk").join("cloister_plugin");
    let src = scratch.path().join("src");
    std::fs::create_dir_all(&wit)?;
    std::fs::create_dir_all(&sdk)?;
    std::fs::write(wit.join("plugin.wit"), WIT)?;
    std::fs::write(sdk.join("__init__.py"), SDK)?;
    let copied = copy_sources(&dir, &src, 0)?;
    if copied == 0 {
        bail!("{}: no .py files", dir.display());
    }
    let built = scratch.path().join("out.wasm");
    let run = Command::new(&args.componentize_py)
        .arg("-q")
        .arg("-d")
        .arg(&wit)
        .args(["-w", args.world.wit_name(), "componentize", "--stub-wasi"])
        .arg(&module)
        .arg("-p")
        .arg(&src)
        .arg("-p")
        .arg(scratch.path().join("sdk"))
        .arg("-o")
        .arg(&built)
        .current_dir(&src)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .with_context(|| not_installed(&args.componentize_py))?;
    if !run.status.success() {
        let stderr = String::from_utf8_lossy(&run.stderr);
        let stdout = String::from_utf8_lossy(&run.stdout);
        bail!(
            "componentize-py could not build {} as a `{}` ({}):\n{}{}",
            args.source.display(),
            args.world.wit_name(),
            run.status,
            stdout.trim_end(),
            stderr.trim_end()
        );
    }
    let bytes = std::fs::read(&built).context("componentize-py wrote no component")?;

    // The same checks `cloister plugin add` makes, before anything is kept.
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let report = runtime.inspect(&bytes);
    if let Err(e) = &report.verdict {
        // As `plugin inspect`: exit 2 for a component the sandbox refuses.
        tell!(
            "error: the built component is refused by the sandbox [{}]: {e}; nothing was written",
            e.code()
        );
        return Ok(ExitCode::from(2));
    }
    let Some(metadata) = &report.metadata else {
        bail!("the built component does not describe itself");
    };
    if metadata.kind != args.world.kind()
        || report.fitted != (args.world == World::FittedFeaturizer)
    {
        bail!(
            "the plugin class is a {}{}, but --world is `{}`: derive from the SDK class of that world, or pass its world",
            metadata.kind,
            if report.fitted { " (fitted)" } else { "" },
            args.world.wit_name()
        );
    }
    write_atomically(&output, &bytes)?;
    say!("built:       {}", output.display());
    say!("digest:      sha256:{}", report.digest);
    say!(
        "size:        {} bytes ({:.1} MB)",
        report.size,
        report.size as f64 / 1e6
    );
    say!("name:        {} {}", metadata.name, metadata.version);
    say!(
        "kind:        {}{}",
        metadata.kind,
        if report.fitted { " (fitted)" } else { "" }
    );
    say!("took:        {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn is_module_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn not_installed(exe: &Path) -> String {
    format!(
        "cannot run {}: install it with `pip install componentize-py=={COMPONENTIZE_PY}` (or name it with --componentize-py)",
        exe.display()
    )
}

/// componentize-py's bindings change between releases; the SDK is written
/// against one. Another release is refused with what to install.
fn check_version(exe: &Path) -> Result<()> {
    let out = Command::new(exe)
        .arg("--version")
        .output()
        .with_context(|| not_installed(exe))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().last().unwrap_or_default();
    if !out.status.success() || version != COMPONENTIZE_PY {
        bail!(
            "{} reports version {:?}; the Cloister Python SDK is built and tested with {COMPONENTIZE_PY} (pip install componentize-py=={COMPONENTIZE_PY})",
            exe.display(),
            version
        );
    }
    Ok(())
}

/// Copies the `.py` files under `from` (no hidden entries, no
/// `__pycache__`, no links) into `to`; how many.
fn copy_sources(from: &Path, to: &Path, depth: usize) -> Result<usize> {
    if depth > 8 {
        bail!("{}: directories nested too deep", from.display());
    }
    std::fs::create_dir_all(to)?;
    let mut n = 0;
    let entries =
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str.starts_with('.') || name_str == "__pycache__" {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            n += copy_sources(&entry.path(), &to.join(&name), depth + 1)?;
        } else if kind.is_file() && name_str.ends_with(".py") {
            std::fs::copy(entry.path(), to.join(&name))
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so that `path` is either the old file or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
