//! Runtime errors. Every message is written by the host: no text a plugin
//! controls (its error details, stderr, trap messages) appears in them, except
//! import names (validated component-model names) and configuration keys that
//! the plugin declared.

use std::fmt;
use std::time::Duration;

use crate::types::{ErrorCode, PluginKind};

/// Everything that can go wrong loading or running a plugin.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The bytes are not a WebAssembly component.
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(&'static str),
    /// The component is larger than the runtime accepts.
    #[error("the component is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Validation or compilation failed.
    #[error("the component is invalid and cannot be compiled")]
    Invalid {
        /// wasmtime's diagnosis, for the administrators' log.
        detail: String,
    },
    /// The component imports interfaces the sandbox does not provide.
    #[error(
        "refused: the component imports {} outside the plugin sandbox: {}",
        if .0.len() == 1 { "an interface" } else { "interfaces" },
        .0.join(", ")
    )]
    ForbiddenImports(Vec<String>),
    /// The component exports no (or more than one) plugin world.
    #[error(
        "refused: the component does not export exactly one Cloister plugin world (preprocessor, featurizer or selector) of cloister:plugin@0.1"
    )]
    NoPluginWorld,
    /// The component's exports do not have the types of `plugin.wit`.
    #[error("refused: the component's exports do not match the Cloister plugin interface")]
    InterfaceMismatch {
        /// wasmtime's diagnosis, for the administrators' log.
        detail: String,
    },
    /// The metadata the plugin describes itself with is unusable.
    #[error("refused: plugin metadata field `{field}` {problem}")]
    BadMetadata {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The plugin says it is one kind but exports another world.
    #[error(
        "refused: the plugin describes itself as a {declared} but exports the {exported} world"
    )]
    KindMismatch {
        /// Kind in its metadata.
        declared: PluginKind,
        /// Kind of its exports.
        exported: PluginKind,
    },
    /// A plugin of one kind was used as another.
    #[error("wrong plugin kind: a {expected} is needed here, but this plugin is a {actual}")]
    WrongKind {
        /// Needed kind.
        expected: PluginKind,
        /// Actual kind.
        actual: PluginKind,
    },
    /// A configuration key the plugin does not declare.
    #[error("unknown configuration key `{key}`; the plugin accepts: {accepted}")]
    UnknownConfigKey {
        /// The key given.
        key: String,
        /// The declared keys, comma-separated.
        accepted: String,
    },
    /// A configuration key given twice.
    #[error("configuration key `{0}` is given more than once")]
    DuplicateConfigKey(String),
    /// A resource limit was exceeded; the instance was discarded.
    #[error("limit exceeded: {0}; the plugin instance was discarded")]
    LimitExceeded(Limit),
    /// The plugin trapped; the instance was discarded.
    #[error("the plugin crashed ({0}); the plugin instance was discarded")]
    Trap(TrapKind),
    /// The plugin called `exit`.
    #[error("the plugin called exit; the plugin instance was discarded")]
    Exited,
    /// The plugin returned an error. Only the code (and a declared key) is
    /// shown; the plugin's own text went to the plugin log.
    #[error("the plugin reported {}{}", .code.as_str(), match .key { Some(k) => format!(" for configuration key `{k}`"), None => String::new() })]
    Plugin {
        /// The fixed code.
        code: ErrorCode,
        /// For `invalid-config`: the key, if the plugin declares it.
        key: Option<String>,
    },
    /// The plugin returned output that breaks the interface's rules.
    #[error("the plugin returned invalid output: {0}")]
    InvalidOutput(OutputViolation),
    /// The host was asked to pass invalid input to a plugin.
    #[error("invalid input for the plugin: {0}")]
    InvalidInput(String),
    /// The instance failed earlier and cannot be used again.
    #[error("this plugin instance failed earlier and was discarded; start a new one")]
    Discarded,
    /// An engine or host failure unrelated to the plugin's behaviour.
    #[error("internal runtime error: {0}")]
    Internal(String),
}

impl RuntimeError {
    /// A short stable code for logs, APIs and tests.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::NotAComponent(_) => "not-a-component",
            RuntimeError::TooLarge { .. } => "too-large",
            RuntimeError::Invalid { .. } => "invalid-component",
            RuntimeError::ForbiddenImports(_) => "forbidden-imports",
            RuntimeError::NoPluginWorld => "no-plugin-world",
            RuntimeError::InterfaceMismatch { .. } => "interface-mismatch",
            RuntimeError::BadMetadata { .. } => "bad-metadata",
            RuntimeError::KindMismatch { .. } => "kind-mismatch",
            RuntimeError::WrongKind { .. } => "wrong-kind",
            RuntimeError::UnknownConfigKey { .. } => "unknown-config-key",
            RuntimeError::DuplicateConfigKey(_) => "duplicate-config-key",
            RuntimeError::LimitExceeded(Limit::Fuel { .. }) => "limit-fuel",
            RuntimeError::LimitExceeded(Limit::Memory { .. }) => "limit-memory",
            RuntimeError::LimitExceeded(Limit::Output { .. }) => "limit-output",
            RuntimeError::LimitExceeded(Limit::Timeout { .. }) => "limit-timeout",
            RuntimeError::Trap(_) => "trap",
            RuntimeError::Exited => "exited",
            RuntimeError::Plugin { .. } => "plugin-error",
            RuntimeError::InvalidOutput(_) => "invalid-output",
            RuntimeError::InvalidInput(_) => "invalid-input",
            RuntimeError::Discarded => "discarded",
            RuntimeError::Internal(_) => "internal",
        }
    }
}

/// Which limit was exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// The CPU budget (fuel) of one call.
    Fuel {
        /// The budget.
        budget: u64,
    },
    /// The linear-memory cap.
    Memory {
        /// The cap in bytes.
        bytes: usize,
    },
    /// The output-size cap.
    Output {
        /// The cap in bytes.
        limit: usize,
    },
    /// The wall-clock timeout of one call.
    Timeout {
        /// The timeout.
        after: Duration,
    },
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Fuel { budget } => write!(f, "CPU budget of {budget} fuel units per call"),
            Limit::Memory { bytes } => write!(f, "memory cap of {} MiB", bytes / (1024 * 1024)),
            Limit::Output { limit } => write!(f, "output cap of {limit} bytes per call"),
            Limit::Timeout { after } => {
                write!(f, "wall-clock timeout of {} ms per call", after.as_millis())
            }
        }
    }
}

/// Why a plugin trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// `unreachable` was executed: in Rust plugins, a panic.
    Panic,
    /// The stack overflowed (or, for Rust's shadow stack in linear memory,
    /// an out-of-bounds access: deep recursion shows up this way).
    StackOverflow,
    /// An out-of-bounds memory access.
    MemoryOutOfBounds,
    /// Integer division by zero or overflow.
    Arithmetic,
    /// Any other trap.
    Other,
}

impl fmt::Display for TrapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrapKind::Panic => "panic / unreachable",
            TrapKind::StackOverflow => "stack overflow",
            TrapKind::MemoryOutOfBounds => {
                "out-of-bounds memory access (e.g. shadow-stack overflow from deep recursion)"
            }
            TrapKind::Arithmetic => "integer arithmetic fault",
            TrapKind::Other => "other trap",
        })
    }
}

/// How a plugin's output broke the interface's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputViolation {
    /// Wrong number of output rows or decisions.
    #[error("expected {expected} results, got {got}")]
    WrongCount {
        /// Expected count.
        expected: usize,
        /// Returned count.
        got: usize,
    },
    /// The CSR offsets are malformed.
    #[error("malformed sparse-batch offsets")]
    BadOffsets,
    /// A feature index is not below the declared dimension.
    #[error("row {row}: feature index {index} is out of range for dimension {dimension}")]
    IndexOutOfRange {
        /// Row in the batch.
        row: usize,
        /// The index.
        index: u32,
        /// The declared dimension.
        dimension: u32,
    },
    /// Indices within a row are not strictly increasing.
    #[error("row {row}: feature indices are not strictly increasing")]
    UnsortedIndices {
        /// Row in the batch.
        row: usize,
    },
    /// A NaN or infinite value.
    #[error("row {row}: non-finite value")]
    NonFinite {
        /// Row in the batch.
        row: usize,
    },
    /// The plugin declared a zero-dimensional feature space.
    #[error("the featurizer declares dimension 0")]
    ZeroDimension,
    /// A preprocessor output record whose id is not (in order) an input id.
    #[error(
        "output record {position} has an id that is not an input id in input order (ids must be preserved, never invented or reordered)"
    )]
    UnknownId {
        /// Position in the output.
        position: usize,
    },
    /// A preprocessor set a label.
    #[error("output record {position} carries a label; preprocessors may not set labels")]
    LabelSet {
        /// Position in the output.
        position: usize,
    },
    /// A selector decision does not match the input item at its position.
    #[error("decision {position} is for a different record than the input at that position")]
    IdMismatch {
        /// Position.
        position: usize,
    },
    /// A selector accepted a class index that does not exist.
    #[error("decision {position} accepts class index {class}, but there are {classes} classes")]
    ClassOutOfRange {
        /// Position.
        position: usize,
        /// The index.
        class: u32,
        /// Number of classes.
        classes: usize,
    },
}
