//! The sandboxed plugin runtime.
//!
//! A [`Runtime`] owns one wasmtime engine (Cranelift, pooling allocator, fuel
//! and epoch interruption), the linker with the sandbox's few WASI
//! interfaces, and the compiled-artifact cache. [`Runtime::load`] turns
//! component bytes into a [`LoadedPlugin`]: digested, compiled once per
//! digest and engine configuration, refused if it imports anything outside
//! the sandbox, and described by its own metadata. A [`PluginInstance`] is one
//! configured instance that runs batches under [`Limits`]; a [`Runner`] runs
//! many batches in parallel on several instances.
//!
//! Failure model: a plugin error (`Err` returned by the plugin) leaves the
//! instance usable; a trap, an exceeded limit or invalid output discards the
//! instance, and the call yields no partial output.

mod bindings;
mod cache;
mod error;
mod key_counts;
mod runner;
pub mod sandbox;
mod validate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

pub use cache::ArtifactCache;
pub use error::{CallStage, Limit, OutputViolation, RuntimeError, Sealed, TrapKind, WorkerFailure};
pub use runner::{Runner, TermCounts};

use bindings::{Bindings, Pre};
use cloister_types::digest::Digest;
use cloister_types::types::{
    DataRecord, Decision, Metadata, PluginError, PluginKind, PredictionSet, SparseBatch, Vocabulary,
};
use sandbox::HostState;

/// Largest component accepted, in bytes.
pub const MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;

/// The default cap on a featurizer's declared dimension: room for hashed
/// features (2^24 buckets) while keeping a model's input layer allocatable.
pub const DEFAULT_MAX_DIMENSION: u32 = 1 << 24;

/// How often the epoch ticks; the wall-clock timeout's resolution.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Per-call resource limits. Defaults are safe for batches of a few hundred
/// records; every limit can be raised or lowered per run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Limits {
    /// CPU budget per call in fuel units (about one per wasm instruction).
    /// Ignored when the runtime was built without fuel metering.
    pub fuel: u64,
    /// Linear-memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// Cap on the size of one call's output, in bytes.
    pub output_bytes: usize,
    /// Wall-clock timeout per call.
    pub timeout: Duration,
    /// Bytes of stdout/stderr kept per instance for the administrators' log.
    pub log_bytes: usize,
    /// Largest feature dimension a featurizer may declare; checked when the
    /// instance is configured, before anything is sized by it.
    pub max_dimension: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 20_000_000_000,
            memory_bytes: 256 * 1024 * 1024,
            output_bytes: 64 * 1024 * 1024,
            timeout: Duration::from_secs(30),
            log_bytes: 64 * 1024,
            max_dimension: DEFAULT_MAX_DIMENSION,
        }
    }
}

/// What plugin calls used: summed over calls (fuel, wall time) or the
/// largest seen (memory). Recorded in the audit log for every plugin stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Usage {
    /// Calls made (configure, dimension and batch calls).
    pub calls: u64,
    /// Fuel consumed (0 when the runtime does not meter fuel).
    pub fuel: u64,
    /// Largest linear memory of any instance, in bytes.
    pub peak_memory_bytes: u64,
    /// Wall-clock time spent inside the plugin, in milliseconds.
    pub wall_ms: u64,
}

impl Usage {
    /// Adds `other` to this: sums, and the larger peak.
    pub fn add(&mut self, other: &Usage) {
        self.calls += other.calls;
        self.fuel += other.fuel;
        self.peak_memory_bytes = self.peak_memory_bytes.max(other.peak_memory_bytes);
        self.wall_ms += other.wall_ms;
    }
}

/// How the engine is built. Part of the compiled-artifact cache key.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Meter fuel (a deterministic CPU budget). Costs some throughput; the
    /// wall-clock timeout applies either way.
    pub fuel: bool,
    /// Instances that may exist at once (the pooling allocator's size).
    pub max_instances: u32,
    /// Upper bound for [`Limits::memory_bytes`].
    pub max_memory_bytes: usize,
    /// Where compiled artifacts are cached.
    pub cache: ArtifactCache,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            fuel: true,
            max_instances: 64,
            max_memory_bytes: 1024 * 1024 * 1024,
            cache: ArtifactCache::in_memory(),
        }
    }
}

/// The plugin runtime: engine, linker, artifact cache and epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    ticker: Option<Ticker>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Ticker {
    stop: mpsc::Sender<()>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(mut t) = self.ticker.take() {
            let _ = t.stop.send(());
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Internal(Sealed::new(e.to_string()))
}

impl Runtime {
    /// Build a runtime.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let mut pool = PoolingAllocationConfig::new();
        let n = config.max_instances.max(1);
        // A component may instantiate up to 64 core modules: a Python
        // plugin built with componentize-py has 38 (CPython, its libc, the
        // WASI stubs and adapters), and at 8 it was refused as invalid.
        // The pool's totals stay as they were, so more core instances in
        // one component means fewer components at once, not more memory
        // (docs/threat-model.md, "Python components").
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .max_core_instances_per_component(64)
            .total_memories(n * 2)
            .max_memories_per_component(2)
            .total_tables(n * 8)
            .max_tables_per_component(8)
            .total_stacks(n)
            .max_memory_size(config.max_memory_bytes)
            .linear_memory_keep_resident(4 * 1024 * 1024)
            .table_keep_resident(64 * 1024);

        let mut c = wasmtime::Config::new();
        c.wasm_component_model(true)
            .wasm_relaxed_simd(false)
            .cranelift_opt_level(wasmtime::OptLevel::Speed)
            .consume_fuel(config.fuel)
            .epoch_interruption(true)
            .parallel_compilation(true)
            .wasm_backtrace_max_frames(None)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&c).map_err(internal)?;
        let mut linker = Linker::new(&engine);
        sandbox::add_to_linker(&mut linker).map_err(internal)?;

        let (stop, rx) = mpsc::channel::<()>();
        let ticking = engine.clone();
        let handle = std::thread::Builder::new()
            .name("cloister-epoch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(EPOCH_TICK) {
                    ticking.increment_epoch();
                }
            })
            .map_err(internal)?;
        Ok(Runtime {
            engine,
            linker,
            config,
            ticker: Some(Ticker {
                stop,
                handle: Some(handle),
            }),
        })
    }

    /// The engine configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// A digest of everything about the engine that affects compiled code:
    /// part of the artifact cache key.
    pub fn engine_fingerprint(&self) -> Digest {
        use std::hash::Hash;
        let mut h = Digest::hasher();
        h.update(b"cloister-engine-v1\0wasmtime-48\0");
        self.engine.precompile_compatibility_hash().hash(&mut h);
        h.finish()
    }

    /// Check the header: a component, not garbage or a core module.
    fn check_header(bytes: &[u8]) -> Result<(), RuntimeError> {
        if bytes.is_empty() {
            return Err(RuntimeError::NotAComponent("the file is empty"));
        }
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(RuntimeError::TooLarge {
                size: bytes.len(),
                limit: MAX_COMPONENT_BYTES,
            });
        }
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(RuntimeError::NotAComponent("the file is not WebAssembly"));
        }
        match bytes[4..8] {
            [0x0d, 0x00, 0x01, 0x00] => Ok(()),
            [0x01, 0x00, 0x00, 0x00] => Err(RuntimeError::NotAComponent(
                "this is a core WebAssembly module; build the plugin with --target wasm32-wasip2",
            )),
            _ => Err(RuntimeError::NotAComponent(
                "unknown WebAssembly version or layer",
            )),
        }
    }

    /// Compile (or fetch from the cache) and return the component.
    fn compile(&self, digest: &Digest, bytes: &[u8]) -> Result<(Component, bool), RuntimeError> {
        let key = cache::cache_key(digest, &self.engine_fingerprint());
        if let Some(c) = self.config.cache.get(&self.engine, &key) {
            return Ok((c, true));
        }
        let component =
            Component::from_binary(&self.engine, bytes).map_err(|e| RuntimeError::Invalid {
                detail: Sealed::new(format!("{e:#}")),
            })?;
        self.config.cache.put(&key, &component);
        Ok((component, false))
    }

    /// Inspect component bytes: always returns a report, with the verdict
    /// inside. Never panics on garbage.
    pub fn inspect(&self, bytes: &[u8]) -> Inspection {
        let digest = Digest::of(bytes);
        let mut report = Inspection {
            digest,
            size: bytes.len(),
            imports: Vec::new(),
            exports: Vec::new(),
            metadata: None,
            fitted: false,
            verdict: Ok(()),
        };
        let loaded = (|| {
            Self::check_header(bytes)?;
            let (component, _) = self.compile(&digest, bytes)?;
            let ty = component.component_type();
            report.imports = ty
                .imports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect();
            report.exports = ty
                .exports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect();
            self.finish_load(digest, component)
        })();
        match loaded {
            Ok(p) => {
                report.fitted = p.fitted;
                report.metadata = Some(p.metadata);
            }
            Err(e) => report.verdict = Err(e),
        }
        report
    }

    /// Load a plugin from component bytes: check, digest, compile (cached),
    /// refuse forbidden imports, and read its metadata in a fresh instance.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedPlugin, RuntimeError> {
        Self::check_header(bytes)?;
        let digest = Digest::of(bytes);
        let (component, _) = self.compile(&digest, bytes)?;
        self.finish_load(digest, component)
    }

    fn finish_load(
        &self,
        digest: Digest,
        component: Component,
    ) -> Result<LoadedPlugin, RuntimeError> {
        let ty = component.component_type();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let forbidden = sandbox::forbidden_imports(imports.iter().map(String::as_str));
        if !forbidden.is_empty() {
            return Err(RuntimeError::ForbiddenImports(forbidden));
        }
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let (kind, fitted) =
            bindings::exported_kind(&exports).ok_or(RuntimeError::NoPluginWorld)?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| {
            RuntimeError::InterfaceMismatch {
                detail: Sealed::new(format!("{e:#}")),
            }
        })?;
        let pre = Pre::new((kind, fitted), instance_pre).map_err(|e| {
            RuntimeError::InterfaceMismatch {
                detail: Sealed::new(format!("{e:#}")),
            }
        })?;
        let mut plugin = LoadedPlugin {
            digest,
            kind,
            fitted,
            metadata: Metadata {
                name: String::new(),
                version: String::new(),
                kind,
                description: String::new(),
                config: Vec::new(),
            },
            pre: Arc::new(pre),
            random: sandbox::PluginRandomness::of(&digest),
        };
        // Ask the plugin to describe itself, in a throwaway instance under
        // tight limits.
        let limits = Limits {
            fuel: 1_000_000_000,
            memory_bytes: 64 * 1024 * 1024,
            output_bytes: 1024 * 1024,
            timeout: Duration::from_secs(5),
            log_bytes: 4096,
            max_dimension: DEFAULT_MAX_DIMENSION,
        };
        let mut inst = PluginInstance::raw(self, &plugin, &limits)?;
        let metadata = inst.call(|store, b| b.describe(store).map(Ok))?;
        validate::metadata(&metadata)?;
        if metadata.kind != kind {
            return Err(RuntimeError::KindMismatch {
                declared: metadata.kind,
                exported: kind,
            });
        }
        plugin.metadata = metadata;
        Ok(plugin)
    }
}

/// What `cloister plugin inspect` reports.
#[derive(Debug)]
pub struct Inspection {
    /// SHA-256 of the bytes: the plugin's identity.
    pub digest: Digest,
    /// Size in bytes.
    pub size: usize,
    /// Every import the component declares.
    pub imports: Vec<String>,
    /// Every export.
    pub exports: Vec<String>,
    /// The plugin's self-description, when it loaded.
    pub metadata: Option<Metadata>,
    /// A fitted featurizer (it exports `fit`).
    pub fitted: bool,
    /// Loadable, or why not.
    pub verdict: Result<(), RuntimeError>,
}

/// A loaded, checked plugin: ready to instantiate.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// SHA-256 of the component bytes: the plugin's identity.
    pub digest: Digest,
    /// Its kind, from its exports (and matching its metadata).
    pub kind: PluginKind,
    /// A featurizer that fits on the training split first (it exports the
    /// `fit` interface of the `fitted-featurizer` world).
    pub fitted: bool,
    /// Its self-description, validated.
    pub metadata: Metadata,
    pre: Arc<Pre>,
    random: sandbox::PluginRandomness,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("digest", &self.digest)
            .field("kind", &self.kind)
            .field("fitted", &self.fitted)
            .field("name", &self.metadata.name)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Check `config` against the declared keys and fill in defaults; the
    /// result is what the plugin's `configure` receives.
    pub fn resolve_config(
        &self,
        config: &[(String, String)],
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        let declared = &self.metadata.config;
        let mut out: Vec<(String, String)> = Vec::with_capacity(declared.len());
        for (k, v) in config {
            if !declared.iter().any(|d| d.name == *k) {
                let accepted: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
                return Err(RuntimeError::UnknownConfigKey {
                    key: k.clone(),
                    accepted: if accepted.is_empty() {
                        "(no keys)".into()
                    } else {
                        accepted.join(", ")
                    },
                });
            }
            if out.iter().any(|(seen, _)| seen == k) {
                return Err(RuntimeError::DuplicateConfigKey(k.clone()));
            }
            out.push((k.clone(), v.clone()));
        }
        for d in declared {
            if !out.iter().any(|(k, _)| *k == d.name) {
                out.push((d.name.clone(), d.default_value.clone()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// A configured instance under `limits`. A fitted featurizer needs its
    /// vocabulary: see [`LoadedPlugin::instantiate_fitted`].
    pub fn instantiate(
        &self,
        runtime: &Runtime,
        config: &[(String, String)],
        limits: &Limits,
    ) -> Result<PluginInstance, RuntimeError> {
        self.instantiate_logged(runtime, config, limits, Purpose::Use(None))
            .map_err(|f| f.error)
    }

    /// A configured instance of a fitted featurizer, loaded with the
    /// vocabulary it was fitted to (`None`: an instance for
    /// [`PluginInstance::terms`], configured but not loaded, whose
    /// `featurize` is refused).
    pub fn instantiate_fitted(
        &self,
        runtime: &Runtime,
        config: &[(String, String)],
        limits: &Limits,
        vocabulary: Option<&Vocabulary>,
    ) -> Result<PluginInstance, RuntimeError> {
        let purpose = match vocabulary {
            Some(v) => Purpose::Use(Some(v)),
            None => Purpose::Fit,
        };
        self.instantiate_logged(runtime, config, limits, purpose)
            .map_err(|f| f.error)
    }

    /// [`LoadedPlugin::instantiate`], keeping the failed instance's log and
    /// usage for the caller to record.
    pub(crate) fn instantiate_logged(
        &self,
        runtime: &Runtime,
        config: &[(String, String)],
        limits: &Limits,
        purpose: Purpose<'_>,
    ) -> Result<PluginInstance, FailedInstance> {
        let bare = |error| FailedInstance {
            error,
            log: (Vec::new(), 0),
            usage: Usage::default(),
        };
        let resolved = self.resolve_config(config).map_err(bare)?;
        let mut inst = PluginInstance::raw(runtime, self, limits).map_err(bare)?;
        match inst.configure_and_size(&resolved, limits.max_dimension, purpose) {
            Ok(()) => Ok(inst),
            Err(error) => Err(FailedInstance {
                error,
                log: inst.take_log(),
                usage: inst.usage(),
            }),
        }
    }
}

/// What an instance is made for, which decides the calls after `configure`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose<'a> {
    /// Batches: a fitted featurizer is loaded with its vocabulary (which it
    /// must have), then asked its dimension.
    Use(Option<&'a Vocabulary>),
    /// A fitted featurizer's `terms` on one record: configured only.
    Fit,
}

/// An instance that failed while being configured: the error, and what its
/// log and usage were, for the administrators' record.
#[derive(Debug)]
pub(crate) struct FailedInstance {
    pub(crate) error: RuntimeError,
    pub(crate) log: (Vec<u8>, u64),
    pub(crate) usage: Usage,
}

/// `Ok` when a plugin of kind `actual` may be used where `expected` is needed.
fn check_kind(expected: PluginKind, actual: PluginKind) -> Result<(), RuntimeError> {
    if expected == actual {
        Ok(())
    } else {
        Err(RuntimeError::WrongKind { expected, actual })
    }
}

/// One instance of a plugin in its own store.
pub struct PluginInstance {
    store: Store<HostState>,
    bindings: Bindings,
    plugin_name: String,
    digest: Digest,
    kind: PluginKind,
    fitted: bool,
    /// A fitted featurizer's vocabulary was loaded (its `featurize` may run).
    loaded: bool,
    declared_keys: Vec<String>,
    limits: Limits,
    fuel_metered: bool,
    dimension: u32,
    discarded: bool,
    usage: Usage,
    stage: CallStage,
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance")
            .field("plugin", &self.plugin_name)
            .field("digest", &self.digest)
            .field("discarded", &self.discarded)
            .finish_non_exhaustive()
    }
}

impl PluginInstance {
    fn raw(
        runtime: &Runtime,
        plugin: &LoadedPlugin,
        limits: &Limits,
    ) -> Result<Self, RuntimeError> {
        if limits.memory_bytes > runtime.config.max_memory_bytes {
            return Err(RuntimeError::InvalidInput(format!(
                "memory limit {} exceeds the runtime's maximum {}",
                limits.memory_bytes, runtime.config.max_memory_bytes
            )));
        }
        if limits.max_dimension == 0 {
            return Err(RuntimeError::InvalidInput(
                "the dimension cap must be at least 1".into(),
            ));
        }
        let state = HostState::new(&plugin.random, limits.memory_bytes, limits.log_bytes);
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        // Instantiation runs start functions: give it the same budget as a call.
        Self::arm(&mut store, limits, runtime.config.fuel)?;
        let bindings = match plugin.pre.instantiate(&mut store) {
            Ok(b) => b,
            Err(e) => {
                let err = classify(e, &store, limits);
                store
                    .data()
                    .log
                    .note(&format!("host: {}", err.admin_detail()));
                return Err(err);
            }
        };
        Ok(PluginInstance {
            store,
            bindings,
            plugin_name: plugin.metadata.name.clone(),
            digest: plugin.digest,
            kind: plugin.kind,
            fitted: plugin.fitted,
            loaded: false,
            declared_keys: plugin
                .metadata
                .config
                .iter()
                .map(|k| k.name.clone())
                .collect(),
            limits: limits.clone(),
            fuel_metered: runtime.config.fuel,
            dimension: 0,
            discarded: false,
            usage: Usage::default(),
            stage: CallStage::Batch,
        })
    }

    fn arm(store: &mut Store<HostState>, limits: &Limits, fuel: bool) -> Result<(), RuntimeError> {
        if fuel {
            store.set_fuel(limits.fuel).map_err(internal)?;
        }
        let ticks = (limits.timeout.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        Ok(())
    }

    /// Run one call under the limits. A plugin error keeps the instance;
    /// anything else discards it.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>, &Bindings) -> wasmtime::Result<Result<R, PluginError>>,
    ) -> Result<R, RuntimeError> {
        if self.discarded {
            return Err(RuntimeError::Discarded);
        }
        Self::arm(&mut self.store, &self.limits, self.fuel_metered)?;
        self.store.data_mut().limiter.memory_denied = false;
        let started = Instant::now();
        let result = f(&mut self.store, &self.bindings);
        let elapsed = started.elapsed();
        self.account(elapsed);
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.store.data().log.note(&format!(
                    "plugin error {}{}: {}",
                    e.code.as_str(),
                    e.key
                        .as_ref()
                        .map(|k| format!(" (key `{k}`)"))
                        .unwrap_or_default(),
                    e.detail
                ));
                // Keep a key only if the plugin declared it (for the log).
                let key = e.key.filter(|k| self.declared_keys.iter().any(|d| d == k));
                tracing::debug!(plugin = %self.digest.short(), "plugin returned an error");
                Err(RuntimeError::Plugin {
                    stage: self.stage,
                    code: Sealed::new(e.code),
                    key: Sealed::new(key),
                })
            }
            Err(e) => {
                let err = classify(e, &self.store, &self.limits);
                tracing::warn!(plugin = %self.digest.short(), error = err.code(), elapsed_ms = elapsed.as_millis() as u64, "plugin instance discarded");
                Err(self.fail(err))
            }
        }
    }

    /// Adds one call's fuel, time and memory to the instance's usage.
    fn account(&mut self, elapsed: Duration) {
        self.usage.calls += 1;
        self.usage.wall_ms += elapsed.as_millis() as u64;
        if self.fuel_metered {
            let left = self.store.get_fuel().unwrap_or(0);
            self.usage.fuel += self.limits.fuel.saturating_sub(left);
        }
        self.usage.peak_memory_bytes = self
            .usage
            .peak_memory_bytes
            .max(self.store.data().limiter.peak_bytes as u64);
    }

    /// What this instance's calls used so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    fn configure(&mut self, config: &[(String, String)]) -> Result<(), RuntimeError> {
        self.stage = CallStage::Configure;
        let r = self.call(|store, b| b.configure(store, config));
        self.stage = CallStage::Batch;
        r
    }

    /// Configures the instance; loads a fitted featurizer's vocabulary;
    /// and for a featurizer asks its dimension and holds it to
    /// `max_dimension` before anything is sized by it.
    fn configure_and_size(
        &mut self,
        config: &[(String, String)],
        max_dimension: u32,
        purpose: Purpose<'_>,
    ) -> Result<(), RuntimeError> {
        match (self.fitted, purpose) {
            (true, Purpose::Use(None)) => {
                return Err(RuntimeError::InvalidInput(
                    "a fitted featurizer runs only with the vocabulary it was fitted to".into(),
                ));
            }
            (false, Purpose::Use(Some(_))) | (false, Purpose::Fit) => {
                return Err(RuntimeError::InvalidInput(
                    "this plugin is not a fitted featurizer: it takes no vocabulary".into(),
                ));
            }
            _ => {}
        }
        self.configure(config)?;
        match purpose {
            Purpose::Fit => return Ok(()),
            Purpose::Use(Some(v)) => {
                validate::vocabulary(v)?;
                self.stage = CallStage::Configure;
                let r = self.call(|store, b| b.load(store, v));
                self.stage = CallStage::Batch;
                r?;
                self.loaded = true;
            }
            Purpose::Use(None) => {}
        }
        if self.kind == PluginKind::Featurizer {
            let dim = self.call(|store, b| b.dimension(store).map(Ok))?;
            if dim == 0 || dim > max_dimension {
                return Err(self.fail(RuntimeError::DimensionOutOfRange {
                    max: max_dimension,
                    declared: Sealed::new(dim),
                }));
            }
            self.dimension = dim;
        }
        Ok(())
    }

    /// The plugin's kind.
    pub fn kind(&self) -> PluginKind {
        self.kind
    }

    /// Whether an earlier failure discarded this instance.
    pub fn is_discarded(&self) -> bool {
        self.discarded
    }

    /// The featurizer's dimension (0 for other kinds).
    pub fn dimension(&self) -> u32 {
        self.dimension
    }

    /// Take the captured stdout/stderr and plugin error details: for the
    /// administrators' log only. Returns (bytes, bytes dropped over the cap).
    pub fn take_log(&mut self) -> (Vec<u8>, u64) {
        self.store.data().log.take()
    }

    /// Discards the instance and writes everything about `e` (the
    /// plugin-chosen parts included) to the administrators' log.
    fn fail(&mut self, e: RuntimeError) -> RuntimeError {
        self.discarded = true;
        self.store
            .data()
            .log
            .note(&format!("host: {}", e.admin_detail()));
        e
    }

    /// Run a preprocessor over a batch. Labels are withheld from the plugin.
    pub fn preprocess(&mut self, batch: &[DataRecord]) -> Result<Vec<DataRecord>, RuntimeError> {
        self.expect(PluginKind::Preprocessor)?;
        validate::unique_ids(batch.iter().map(|r| r.id.as_str()))?;
        let unlabeled = without_labels(batch);
        let input = unlabeled.as_deref().unwrap_or(batch);
        let out = self.call(|store, b| b.process(store, input))?;
        validate::preprocessed(input, &out, self.limits.output_bytes).map_err(|e| self.fail(e))?;
        Ok(out)
    }

    /// A fitted featurizer's term keys of one training record, sorted and
    /// without repeats (an instance made with
    /// [`LoadedPlugin::instantiate_fitted`] and no vocabulary). The label is
    /// withheld from the plugin.
    pub fn terms(&mut self, record: &DataRecord) -> Result<Vec<u64>, RuntimeError> {
        self.expect(PluginKind::Featurizer)?;
        if !self.fitted || self.loaded {
            return Err(RuntimeError::InvalidInput(
                "terms are asked only of a fitted featurizer's fitting instance".into(),
            ));
        }
        let unlabeled;
        let input = if record.label.is_some() {
            unlabeled = DataRecord {
                label: None,
                ..record.clone()
            };
            &unlabeled
        } else {
            record
        };
        let mut out = self.call(|store, b| b.terms(store, input))?;
        validate::terms(&out, self.limits.output_bytes).map_err(|e| self.fail(e))?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Run a featurizer over a batch. Labels are withheld from the plugin.
    pub fn featurize(&mut self, batch: &[DataRecord]) -> Result<SparseBatch, RuntimeError> {
        self.expect(PluginKind::Featurizer)?;
        if self.fitted && !self.loaded {
            return Err(RuntimeError::InvalidInput(
                "a fitted featurizer featurizes only after its vocabulary is loaded".into(),
            ));
        }
        let unlabeled = without_labels(batch);
        let input = unlabeled.as_deref().unwrap_or(batch);
        let out = self.call(|store, b| b.featurize(store, input))?;
        validate::features(batch.len(), self.dimension, &out, self.limits.output_bytes)
            .map_err(|e| self.fail(e))?;
        Ok(out)
    }

    /// Run a selector over a batch of prediction sets.
    pub fn select(
        &mut self,
        classes: &[String],
        batch: &[PredictionSet],
    ) -> Result<Vec<Decision>, RuntimeError> {
        self.expect(PluginKind::Selector)?;
        validate::prediction_sets(classes, batch)?;
        let out = self.call(|store, b| b.select(store, classes, batch))?;
        validate::decisions(batch, classes.len(), &out, self.limits.output_bytes)
            .map_err(|e| self.fail(e))?;
        Ok(out)
    }

    fn expect(&self, kind: PluginKind) -> Result<(), RuntimeError> {
        check_kind(kind, self.kind)
    }
}

/// An instance that was created but never configured: it has no methods and
/// cannot be called, so the interface's rule (configure before any other
/// call) holds. It exists to measure the bare cost of instantiation (store,
/// sandbox, pooling-allocator instance) apart from the `configure` call.
pub struct BareInstance {
    _instance: PluginInstance,
}

impl std::fmt::Debug for BareInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BareInstance")
    }
}

impl LoadedPlugin {
    /// Create an instance without configuring it; see [`BareInstance`].
    pub fn instantiate_bare(
        &self,
        runtime: &Runtime,
        limits: &Limits,
    ) -> Result<BareInstance, RuntimeError> {
        Ok(BareInstance {
            _instance: PluginInstance::raw(runtime, self, limits)?,
        })
    }
}

/// A copy of `batch` without labels, or `None` if it has none.
fn without_labels(batch: &[DataRecord]) -> Option<Vec<DataRecord>> {
    if batch.iter().all(|r| r.label.is_none()) {
        return None;
    }
    Some(
        batch
            .iter()
            .map(|r| DataRecord {
                label: None,
                ..r.clone()
            })
            .collect(),
    )
}

/// Turn a wasmtime error from a call into a typed runtime error.
fn classify(e: wasmtime::Error, store: &Store<HostState>, limits: &Limits) -> RuntimeError {
    if store.data().limiter.memory_denied {
        return RuntimeError::LimitExceeded(Limit::Memory {
            bytes: limits.memory_bytes,
        });
    }
    if e.downcast_ref::<wasmtime_wasi::I32Exit>().is_some() {
        return RuntimeError::Exited;
    }
    if let Some(t) = e.downcast_ref::<Trap>() {
        return match t {
            Trap::OutOfFuel => RuntimeError::LimitExceeded(Limit::Fuel {
                budget: limits.fuel,
            }),
            Trap::Interrupt => RuntimeError::LimitExceeded(Limit::Timeout {
                after: limits.timeout,
            }),
            Trap::UnreachableCodeReached => trap(TrapKind::Panic),
            Trap::StackOverflow => trap(TrapKind::StackOverflow),
            Trap::MemoryOutOfBounds | Trap::HeapMisaligned => trap(TrapKind::MemoryOutOfBounds),
            Trap::IntegerDivisionByZero | Trap::IntegerOverflow | Trap::BadConversionToInteger => {
                trap(TrapKind::Arithmetic)
            }
            _ => trap(TrapKind::Other),
        };
    }
    // Errors raised while lifting the plugin's results (invalid UTF-8, bad
    // discriminants, out-of-bounds lists) are the plugin's fault: a trap.
    // Their text can quote what the plugin returned: the plugin log only.
    store.data().log.note(&format!(
        "host: failure while lifting the plugin's result: {e:#}"
    ));
    trap(TrapKind::Other)
}

fn trap(kind: TrapKind) -> RuntimeError {
    RuntimeError::Trap(Sealed::new(kind))
}

impl LoadedPlugin {
    /// Convenience: run `records` through this featurizer in parallel.
    pub fn runner<'a>(
        &'a self,
        runtime: &'a Runtime,
        config: &[(String, String)],
        limits: Limits,
    ) -> Result<Runner<'a>, RuntimeError> {
        let config = self.resolve_config(config)?;
        Ok(Runner::new(runtime, self, config, limits))
    }

    /// Require this plugin to be of `kind`.
    pub fn require(&self, kind: PluginKind) -> Result<(), RuntimeError> {
        check_kind(kind, self.kind)
    }
}

/// Shared flag used by runners to stop early.
pub(crate) type StopFlag = Arc<AtomicBool>;

pub(crate) fn stopped(flag: &StopFlag) -> bool {
    flag.load(Ordering::Relaxed)
}
