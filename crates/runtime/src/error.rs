//! Runtime errors.
//!
//! **No value a plugin chooses appears in a runtime error's text.** Every
//! message is a fixed sentence per code, plus context the host chose (the
//! limits it set, the kind it needed, keys the user gave). What the plugin
//! chose — the index it returned, the count, the class, the key it named,
//! which trap it hit, the dimension it declared — is kept in a [`Sealed`]
//! field: its `Debug` prints `<sealed>`, it has no `Display` or `Serialize`,
//! and it is read only by the host code that writes the administrators'
//! plugin log ([`RuntimeError::admin_detail`]).

use std::fmt;
use std::time::Duration;

use cloister_types::types::{ErrorCode, PluginKind};

/// A value a plugin chose, held so that it cannot reach a person by
/// accident: it never formats (`Debug` prints `<sealed>`) and cannot be
/// serialized. [`Sealed::for_admin_log`] is the one way to read it, for the
/// administrators' plugin log and for tests.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sealed<T>(T);

impl<T> Sealed<T> {
    pub(crate) fn new(value: T) -> Self {
        Sealed(value)
    }

    /// The plugin-chosen value. Only for the administrators' plugin log (and
    /// tests): never format it into anything a user sees.
    pub fn for_admin_log(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Sealed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<sealed>")
    }
}

/// Where in a plugin's life an error it reported happened (host-chosen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStage {
    /// While being configured.
    Configure,
    /// While processing a batch.
    Batch,
}

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
        detail: Sealed<String>,
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
        detail: Sealed<String>,
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
    /// A configuration key the plugin does not declare. `key` is what the
    /// user gave; `accepted` is the reviewed metadata, fixed by the digest
    /// before the plugin sees any record.
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
    /// A featurizer declared a feature dimension outside what the host
    /// accepts (checked before anything is allocated for it).
    #[error(
        "limit exceeded: the featurizer declares a feature dimension outside 1..={max}; the plugin instance was discarded"
    )]
    DimensionOutOfRange {
        /// The host's cap.
        max: u32,
        /// What the plugin declared.
        declared: Sealed<u32>,
    },
    /// The plugin trapped; the instance was discarded.
    #[error("the plugin crashed; the plugin instance was discarded")]
    Trap(Sealed<TrapKind>),
    /// The plugin called `exit`.
    #[error("the plugin called exit; the plugin instance was discarded")]
    Exited,
    /// The plugin returned an error. Only the stage (host-chosen) is shown;
    /// the plugin's code, key and text go to the plugin log.
    #[error("{}", match .stage {
        CallStage::Configure => "the plugin refused its configuration",
        CallStage::Batch => "the plugin reported an error on a batch",
    })]
    Plugin {
        /// When it happened.
        stage: CallStage,
        /// The plugin's code.
        code: Sealed<ErrorCode>,
        /// The key it named, if it declares it.
        key: Sealed<Option<String>>,
    },
    /// The plugin returned output that breaks the interface's rules.
    #[error(
        "the plugin returned output that breaks the plugin interface's rules; the plugin instance was discarded"
    )]
    InvalidOutput(Sealed<OutputViolation>),
    /// The host was asked to pass invalid input to a plugin. The text is
    /// host-written and names no record.
    #[error("invalid input for the plugin: {0}")]
    InvalidInput(String),
    /// The instance failed earlier and cannot be used again.
    #[error("this plugin instance failed earlier and was discarded; start a new one")]
    Discarded,
    /// An engine or host failure unrelated to the plugin's behaviour.
    #[error("internal runtime error")]
    Internal(Sealed<String>),
    /// A stage that ran on a `cloister worker` failed there: the code and
    /// the message (host-written, like every message here) as the worker's
    /// runtime gave them; the full detail, plugin-chosen values included,
    /// sealed for the administrators' log.
    #[error("{}", .0.message)]
    OnWorker(Box<WorkerFailure>),
}

/// A runtime error as a worker reported it ([`RuntimeError::OnWorker`]).
#[derive(Debug)]
pub struct WorkerFailure {
    /// The error's code on the worker (one of [`RuntimeError::code`]'s).
    code: &'static str,
    /// Its message there.
    message: String,
    /// Its [`RuntimeError::admin_detail`] there.
    detail: Sealed<String>,
}

/// Every code [`RuntimeError::code`] gives.
const CODES: &[&str] = &[
    "not-a-component",
    "too-large",
    "invalid-component",
    "forbidden-imports",
    "no-plugin-world",
    "interface-mismatch",
    "bad-metadata",
    "kind-mismatch",
    "wrong-kind",
    "unknown-config-key",
    "duplicate-config-key",
    "limit-fuel",
    "limit-memory",
    "limit-output",
    "limit-timeout",
    "limit-terms",
    "limit-dimension",
    "trap",
    "exited",
    "plugin-error",
    "invalid-output",
    "invalid-input",
    "discarded",
    "internal",
];

impl RuntimeError {
    /// Whether this is a running plugin's failure — its own error, a trap,
    /// an exit, output the host refused or a limit it hit — whose message
    /// is a fixed sentence and whose reason (the plugin's words, the
    /// values it chose) went to the administrators' plugin log: what a
    /// user is told to look for there.
    pub fn reason_in_plugin_log(&self) -> bool {
        matches!(
            self,
            RuntimeError::Plugin { .. }
                | RuntimeError::Trap(_)
                | RuntimeError::Exited
                | RuntimeError::InvalidOutput(_)
                | RuntimeError::LimitExceeded(_)
        )
    }

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
            RuntimeError::LimitExceeded(Limit::Terms { .. }) => "limit-terms",
            RuntimeError::DimensionOutOfRange { .. } => "limit-dimension",
            RuntimeError::Trap(_) => "trap",
            RuntimeError::Exited => "exited",
            RuntimeError::Plugin { .. } => "plugin-error",
            RuntimeError::InvalidOutput(_) => "invalid-output",
            RuntimeError::InvalidInput(_) => "invalid-input",
            RuntimeError::Discarded => "discarded",
            RuntimeError::Internal(_) => "internal",
            RuntimeError::OnWorker(f) => f.code,
        }
    }

    /// The error a worker reported for a stage it ran (its
    /// [`code`](Self::code), `Display` text and
    /// [`admin_detail`](Self::admin_detail)). A code this runtime does not
    /// know becomes `internal`.
    pub fn on_worker(code: &str, message: String, detail: String) -> Self {
        RuntimeError::OnWorker(Box::new(WorkerFailure {
            code: CODES
                .iter()
                .find(|c| **c == code)
                .copied()
                .unwrap_or("internal"),
            message,
            detail: Sealed::new(detail),
        }))
    }

    /// Two parts of one featurizer's run declared different dimensions.
    pub fn inconsistent_dimension() -> Self {
        RuntimeError::InvalidOutput(Sealed::new(OutputViolation::InconsistentDimension))
    }

    /// Everything known about the error, plugin-chosen values included:
    /// only for the administrators' plugin log.
    pub fn admin_detail(&self) -> String {
        match self {
            RuntimeError::Invalid { detail } | RuntimeError::InterfaceMismatch { detail } => {
                format!("{self} [{}]: {}", self.code(), detail.for_admin_log())
            }
            RuntimeError::Internal(detail) => {
                format!("{self} [{}]: {}", self.code(), detail.for_admin_log())
            }
            RuntimeError::DimensionOutOfRange { declared, .. } => {
                format!(
                    "{self} [{}]: declared {}",
                    self.code(),
                    declared.for_admin_log()
                )
            }
            RuntimeError::Trap(kind) => {
                format!("{self} [{}]: {}", self.code(), kind.for_admin_log())
            }
            RuntimeError::Plugin { code, key, .. } => format!(
                "{self} [{}]: {}{}",
                self.code(),
                code.for_admin_log().as_str(),
                key.for_admin_log()
                    .as_ref()
                    .map(|k| format!(" for key `{k}`"))
                    .unwrap_or_default()
            ),
            RuntimeError::InvalidOutput(v) => {
                format!("{self} [{}]: {}", self.code(), v.for_admin_log())
            }
            RuntimeError::OnWorker(f) => f.detail.for_admin_log().clone(),
            _ => format!("{self} [{}]", self.code()),
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
    /// The distinct term keys a fitted featurizer's fit may produce.
    Terms {
        /// The cap.
        max: usize,
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
            Limit::Terms { max } => write!(f, "fit cap of {max} distinct terms"),
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

/// How a plugin's output broke the interface's rules. Its fields are
/// plugin-chosen: it travels only inside [`Sealed`].
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
    /// Instances of one featurizer declared different dimensions.
    #[error("instances of the featurizer declared different dimensions")]
    InconsistentDimension,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_from_a_worker_keeps_its_code_and_seals_its_detail() {
        let e = RuntimeError::on_worker(
            "invalid-output",
            "the plugin returned output that breaks the plugin interface's rules".into(),
            "row 3: feature index 99 is out of range".into(),
        );
        assert_eq!(e.code(), "invalid-output");
        assert_eq!(
            e.to_string(),
            "the plugin returned output that breaks the plugin interface's rules"
        );
        assert_eq!(e.admin_detail(), "row 3: feature index 99 is out of range");
        let debug = format!("{e:?}");
        assert!(
            debug.contains("<sealed>") && !debug.contains("99"),
            "{debug}"
        );
        // A code this runtime does not give is not passed on.
        let odd = RuntimeError::on_worker("made-up", "x".into(), String::new());
        assert_eq!(odd.code(), "internal");
        // Every code the runtime gives is known.
        for e in [
            RuntimeError::Exited,
            RuntimeError::Discarded,
            RuntimeError::NoPluginWorld,
            RuntimeError::LimitExceeded(Limit::Terms { max: 1 }),
            RuntimeError::inconsistent_dimension(),
        ] {
            assert!(CODES.contains(&e.code()), "{}", e.code());
        }
    }
}
