//! The sandbox a plugin instance lives in: the only WASI interfaces that
//! exist for it, its store state, and its resource limiter.
//!
//! What a plugin sees:
//! - **No filesystem, sockets or HTTP**: those interfaces are not linked,
//!   and a component importing them is refused when loaded (see
//!   [`forbidden_imports`]).
//! - **Environment and arguments**: empty. **stdin**: closed.
//! - **stdout and stderr**: captured into a bounded per-instance log that
//!   only administrators read; bytes past the bound are counted and dropped.
//! - **Clocks**: the wall clock is frozen at 1970-01-01T00:00:00Z and the
//!   monotonic clock at 0; a subscription to either (a sleep) is ready at
//!   once. A plugin cannot observe time, so it cannot time the host or behave
//!   differently run to run, and it cannot block a host thread in a sleep
//!   that the wall-clock timeout could not interrupt.
//! - **Host-side resources** (stream handles, pollables) are capped per
//!   instance, so a plugin cannot grow host memory outside its own cap.
//! - **Randomness**: a deterministic byte stream derived from the plugin's
//!   digest. It exists so that `std`'s hash maps work; it is not secret and
//!   must not be used for cryptography.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use wasmtime::ResourceLimiter;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView as _};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use cloister_types::digest::Digest;

/// WASI interfaces a plugin may import (any 0.2.x version). Everything else
/// is refused at load time.
pub const ALLOWED_WASI_INTERFACES: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// The plugin interface's own type-only interface, which components may
/// import because the exported interfaces use its types.
const PLUGIN_TYPES_INTERFACE: &str = "cloister:plugin/types";

/// Split `ns:pkg/iface@1.2.3` into (`ns:pkg/iface`, `Some("1.2.3")`).
fn split_version(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((base, version)) => (base, Some(version)),
        None => (name, None),
    }
}

/// The imports among `imports` that the sandbox does not provide.
pub fn forbidden_imports<'a>(imports: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    imports
        .into_iter()
        .filter(|name| !import_allowed(name))
        .map(str::to_string)
        .collect()
}

fn import_allowed(name: &str) -> bool {
    let (base, version) = split_version(name);
    let compatible = |prefix: &str| version.is_some_and(|v| v.starts_with(prefix));
    (ALLOWED_WASI_INTERFACES.contains(&base) && compatible("0.2."))
        || (base == PLUGIN_TYPES_INTERFACE && compatible("0.1."))
}

/// Link exactly the allowed interfaces, nothing else.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{cli, clocks, random, sync};
    let l = linker;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<HostState, HasIo>(l, |t| {
        &mut t.table
    })?;
    sync::io::poll::add_to_linker::<HostState, HasIo>(l, |t| &mut t.table)?;
    sync::io::streams::add_to_linker::<HostState, HasIo>(l, |t| &mut t.table)?;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<HostState, FrozenMonotonic>(l, |t| {
        FrozenMonotonicView(&mut t.table)
    })?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |t| t.wasi.random())?;
    // The type-only plugin interface, in case a component imports it.
    l.instance(&format!("{PLUGIN_TYPES_INTERFACE}@0.1.0"))?;
    Ok(())
}

struct HasIo;

/// Most host-side resources (streams, pollables) one instance may hold.
const MAX_RESOURCES: usize = 4096;

/// The monotonic clock plugins see: always 0, and subscriptions that are
/// ready immediately (wasmtime-wasi's own would sleep in a host call).
struct FrozenMonotonic;

impl HasData for FrozenMonotonic {
    type Data<'a> = FrozenMonotonicView<'a>;
}

struct FrozenMonotonicView<'a>(&'a mut ResourceTable);

struct ReadyNow;

#[wasmtime_wasi::async_trait]
impl Pollable for ReadyNow {
    async fn ready(&mut self) {}
}

impl FrozenMonotonicView<'_> {
    fn ready_now(&mut self) -> wasmtime::Result<Resource<DynPollable>> {
        let ready = self.0.push(ReadyNow)?;
        wasmtime_wasi::p2::subscribe(self.0, ready)
    }
}

impl wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host for FrozenMonotonicView<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(0)
    }
    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1_000_000_000)
    }
    fn subscribe_instant(&mut self, _when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.ready_now()
    }
    fn subscribe_duration(&mut self, _duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.ready_now()
    }
}

impl HasData for HasIo {
    type Data<'a> = &'a mut ResourceTable;
}

/// The state of one plugin instance's store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) log: PluginLog,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// A fresh sandbox for a plugin whose randomness is `random`.
    pub(crate) fn new(random: &PluginRandomness, memory_bytes: usize, log_bytes: usize) -> Self {
        let log = PluginLog::new(log_bytes);
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdout(log.clone())
            .stderr(log.clone())
            .wall_clock(FrozenWallClock)
            .secure_random(random.cycle())
            .insecure_random(random.cycle())
            .insecure_random_seed(random.seed)
            .max_random_size(64 * 1024)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        HostState {
            wasi: builder.build(),
            table,
            limiter: Limiter::new(memory_bytes),
            log,
        }
    }
}

/// The deterministic randomness of one plugin, derived once from its digest
/// and shared by all its instances.
#[derive(Clone)]
pub(crate) struct PluginRandomness {
    stream: Arc<[u8]>,
    seed: u128,
}

impl PluginRandomness {
    /// A 4 KiB byte cycle and a 128-bit seed derived from `digest`.
    pub(crate) fn of(digest: &Digest) -> Self {
        let seed = digest.derive(b"cloister plugin randomness");
        let mut stream = Vec::with_capacity(4096);
        let mut block = seed;
        while stream.len() < 4096 {
            block = Digest::of(&block).0;
            stream.extend_from_slice(&block);
        }
        let mut seed128 = [0u8; 16];
        seed128.copy_from_slice(&seed[..16]);
        PluginRandomness {
            stream: stream.into(),
            seed: u128::from_le_bytes(seed128),
        }
    }

    /// A reader cycling through the shared stream (no copy per instance).
    fn cycle(&self) -> ByteCycle {
        ByteCycle {
            bytes: Arc::clone(&self.stream),
            pos: 0,
        }
    }
}

/// Cycles through a shared byte stream; what `wasi:random` returns.
struct ByteCycle {
    bytes: Arc<[u8]>,
    pos: usize,
}

impl rand_core::TryRng for ByteCycle {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        if self.bytes.is_empty() {
            dst.fill(0);
            return Ok(());
        }
        for d in dst {
            *d = self.bytes[self.pos];
            self.pos = (self.pos + 1) % self.bytes.len();
        }
        Ok(())
    }
}

/// The wall clock plugins see: always the Unix epoch.
struct FrozenWallClock;

impl HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// Caps linear memory and tables, and remembers whether a cap was hit so
/// that the resulting trap can be reported as a limit, not a crash.
pub(crate) struct Limiter {
    memory_bytes: usize,
    pub(crate) memory_denied: bool,
    /// The largest linear memory granted so far, in bytes.
    pub(crate) peak_bytes: usize,
}

/// Tables are small in Rust components; this is generous.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl Limiter {
    fn new(memory_bytes: usize) -> Self {
        Limiter {
            memory_bytes,
            memory_denied: false,
            peak_bytes: 0,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_denied = true;
            return Err(wasmtime::format_err!("linear memory limit reached"));
        }
        self.peak_bytes = self.peak_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A bounded capture of what a plugin writes to stdout and stderr. Writes
/// never fail (a failing write would make `eprintln!` panic); bytes beyond
/// the bound are counted and dropped.
#[derive(Clone)]
pub(crate) struct PluginLog(Arc<Mutex<LogBuffer>>);

struct LogBuffer {
    bytes: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl PluginLog {
    fn new(cap: usize) -> Self {
        PluginLog(Arc::new(Mutex::new(LogBuffer {
            bytes: Vec::new(),
            cap,
            dropped: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, LogBuffer> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn append(&self, data: &[u8]) {
        let mut b = self.lock();
        let room = b.cap.saturating_sub(b.bytes.len());
        let take = room.min(data.len());
        b.bytes.extend_from_slice(&data[..take]);
        b.dropped += (data.len() - take) as u64;
    }

    /// Append a host-written note (e.g. a plugin error's detail).
    pub(crate) fn note(&self, text: &str) {
        self.append(text.as_bytes());
        if !text.ends_with('\n') {
            self.append(b"\n");
        }
    }

    /// Take what was captured so far, with the count of dropped bytes.
    pub(crate) fn take(&self) -> (Vec<u8>, u64) {
        let mut b = self.lock();
        let dropped = std::mem::take(&mut b.dropped);
        (std::mem::take(&mut b.bytes), dropped)
    }
}

impl IsTerminal for PluginLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Most bytes a plugin may write in one `write` call.
const WRITE_PERMIT: usize = 64 * 1024;

impl OutputStream for PluginLog {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for PluginLog {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for PluginLog {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_allowlist() {
        let bad = forbidden_imports([
            "wasi:io/streams@0.2.6",
            "wasi:cli/stderr@0.2.0",
            "wasi:sockets/tcp@0.2.0",
            "wasi:filesystem/preopens@0.2.0",
            "wasi:clocks/monotonic-clock@0.2.0",
            "wasi:io/streams@0.3.0",
            "wasi:io/streams",
            "cloister:plugin/types@0.1.0",
            "evil:pkg/iface@1.0.0",
        ]);
        assert_eq!(
            bad,
            vec![
                "wasi:sockets/tcp@0.2.0",
                "wasi:filesystem/preopens@0.2.0",
                "wasi:io/streams@0.3.0",
                "wasi:io/streams",
                "evil:pkg/iface@1.0.0",
            ]
        );
    }

    #[test]
    fn log_is_bounded_and_counts_drops() {
        let log = PluginLog::new(4);
        log.append(b"abcdef");
        log.append(b"gh");
        let (bytes, dropped) = log.take();
        assert_eq!(bytes, b"abcd");
        assert_eq!(dropped, 4);
        assert_eq!(log.take(), (Vec::new(), 0));
    }
}
