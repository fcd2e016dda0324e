//! Running many batches through one plugin on several instances at once.
//!
//! Each worker thread owns one instance, configured once, and pulls batches
//! from a shared counter. The result is all-or-nothing: if any batch fails,
//! the run stops and returns the error of the earliest failing batch, and no
//! output is returned. An instance that failed is discarded; the next run
//! starts fresh ones. Plugins must not depend on state kept between batches:
//! which instance runs which batch is up to the scheduler.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::key_counts::{KeyCounter, TooMany};
use super::{
    Limits, LoadedPlugin, PluginInstance, Purpose, Runtime, RuntimeError, StopFlag, Usage, stopped,
};
use cloister_types::types::{
    DataRecord, Decision, PluginKind, PredictionSet, SparseBatch, Vocabulary,
};

/// The failures of a parallel run: the first to fail raises the flag
/// that stops the other workers, and the run reports the error of the
/// earliest item, whatever the schedule.
struct Failures {
    stop: StopFlag,
    errors: Mutex<Vec<(usize, RuntimeError)>>,
}

impl Failures {
    fn new() -> Self {
        Failures {
            stop: Arc::new(AtomicBool::new(false)),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Item `at` failed with `e`: stop the run.
    fn fail(&self, at: usize, e: RuntimeError) {
        self.stop.store(true, Ordering::Relaxed);
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, e));
    }

    fn stopped(&self) -> bool {
        stopped(&self.stop)
    }

    /// The earliest item's error, if any failed.
    fn first(self) -> Result<(), RuntimeError> {
        let mut errors = self.errors.into_inner().unwrap_or_else(|p| p.into_inner());
        errors.sort_by_key(|(at, _)| *at);
        match errors.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// What a fitted featurizer's fit counted: the records, and in how many
/// of them each term key occurs.
#[derive(Debug, Clone, Default)]
pub struct TermCounts {
    /// Records the keys were counted over.
    pub documents: usize,
    /// Each term key with the number of records that contain it, sorted
    /// by key.
    pub counts: Vec<(u64, u32)>,
}

impl TermCounts {
    /// The counts of several parts of one fit (disjoint sets of records,
    /// each counted by [`Runner::term_counts`], on workers), summed: what
    /// one run over all their records counts. More than `max_distinct`
    /// distinct keys fails as that run would.
    pub fn merge(parts: Vec<TermCounts>, max_distinct: usize) -> Result<TermCounts, RuntimeError> {
        let documents = parts.iter().map(|p| p.documents).sum();
        let mut all: Vec<(u64, u32)> = parts.into_iter().flat_map(|p| p.counts).collect();
        all.sort_unstable_by_key(|(k, _)| *k);
        let mut counts: Vec<(u64, u32)> = Vec::with_capacity(all.len());
        for (key, n) in all {
            match counts.last_mut() {
                Some((k, m)) if *k == key => *m = m.saturating_add(n),
                _ => {
                    if counts.len() == max_distinct {
                        return Err(RuntimeError::LimitExceeded(super::Limit::Terms {
                            max: max_distinct,
                        }));
                    }
                    counts.push((key, n));
                }
            }
        }
        Ok(TermCounts { documents, counts })
    }
}

/// Runs a plugin over many batches in parallel.
pub struct Runner<'a> {
    runtime: &'a Runtime,
    plugin: &'a LoadedPlugin,
    config: Vec<(String, String)>,
    limits: Limits,
    workers: usize,
    batch_size: usize,
    log: Mutex<Vec<u8>>,
    log_dropped: AtomicUsize,
    usage: Mutex<Usage>,
    dimension: std::sync::atomic::AtomicU32,
    vocabulary: Option<Arc<Vocabulary>>,
}

impl std::fmt::Debug for Runner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("plugin", &self.plugin)
            .field("workers", &self.workers)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl<'a> Runner<'a> {
    pub(crate) fn new(
        runtime: &'a Runtime,
        plugin: &'a LoadedPlugin,
        config: Vec<(String, String)>,
        limits: Limits,
    ) -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Runner {
            runtime,
            plugin,
            config,
            limits,
            workers,
            batch_size: 256,
            log: Mutex::new(Vec::new()),
            log_dropped: AtomicUsize::new(0),
            usage: Mutex::new(Usage::default()),
            dimension: std::sync::atomic::AtomicU32::new(0),
            vocabulary: None,
        }
    }

    /// A fitted featurizer's vocabulary: every instance that featurizes
    /// is loaded with it.
    pub fn vocabulary(mut self, v: Arc<Vocabulary>) -> Self {
        self.vocabulary = Some(v);
        self
    }

    fn purpose(&self) -> Purpose<'_> {
        Purpose::Use(self.vocabulary.as_deref())
    }

    /// Use `n` worker instances (at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Records per call (at least 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The plugin's captured output and error details so far (administrators
    /// only), with the count of bytes dropped over the per-instance cap.
    pub fn take_log(&self) -> (Vec<u8>, usize) {
        let log = std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()));
        (log, self.log_dropped.swap(0, Ordering::Relaxed))
    }

    /// The feature dimension the featurizer's instances declared (0 before
    /// any ran, and for other kinds).
    pub fn dimension(&self) -> u32 {
        self.dimension.load(Ordering::Relaxed)
    }

    /// What every instance of this runner used so far (fuel, wall time,
    /// peak memory), successful and failed calls alike.
    pub fn usage(&self) -> Usage {
        *self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn collect_usage(&self, inst: &PluginInstance) {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&inst.usage());
    }

    /// Keeps the log and usage of an instance that failed to configure;
    /// its error.
    fn absorb(&self, f: super::FailedInstance) -> RuntimeError {
        self.keep_log(f.log);
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&f.usage);
        f.error
    }

    fn collect_log(&self, inst: &mut PluginInstance) {
        self.keep_log(inst.take_log());
    }

    fn keep_log(&self, (bytes, dropped): (Vec<u8>, u64)) {
        if !bytes.is_empty() {
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&bytes);
        }
        self.log_dropped
            .fetch_add(dropped as usize, Ordering::Relaxed);
    }

    /// Run `op` over `items` in batches; results in input order.
    fn run<I: Sync, O: Send>(
        &self,
        kind: PluginKind,
        items: &[I],
        op: impl Fn(&mut PluginInstance, &[I]) -> Result<O, RuntimeError> + Sync,
    ) -> Result<Vec<O>, RuntimeError> {
        self.plugin.require(kind)?;
        let chunks: Vec<&[I]> = items.chunks(self.batch_size).collect();
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<O>>> = chunks.iter().map(|_| Mutex::new(None)).collect();
        let failures = Failures::new();
        let workers = self.workers.min(chunks.len());
        let fail = |at: usize, e: RuntimeError| failures.fail(at, e);
        let work = || {
            let mut inst = match self.plugin.instantiate_logged(
                self.runtime,
                &self.config,
                &self.limits,
                self.purpose(),
            ) {
                Ok(i) => {
                    // The dimension is asked before any record is
                    // seen: every instance must declare the same.
                    let d = i.dimension();
                    if let Err(seen) =
                        self.dimension
                            .compare_exchange(0, d, Ordering::Relaxed, Ordering::Relaxed)
                        && seen != d
                    {
                        return fail(
                            0,
                            RuntimeError::InvalidOutput(super::Sealed::new(
                                super::OutputViolation::InconsistentDimension,
                            )),
                        );
                    }
                    i
                }
                Err(f) => return fail(0, self.absorb(f)),
            };
            while !failures.stopped() {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = chunks.get(at) else { break };
                let result = op(&mut inst, chunk);
                self.collect_log(&mut inst);
                match result {
                    Ok(out) => *slots[at].lock().unwrap_or_else(|p| p.into_inner()) = Some(out),
                    Err(e) => {
                        self.collect_usage(&inst);
                        return fail(at, e);
                    }
                }
            }
            self.collect_usage(&inst);
        };
        // One worker runs on the calling thread: a small batch (a
        // deployment's request) pays no thread spawn.
        if workers == 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(work);
                }
            });
        }
        failures.first()?;
        slots
            .into_iter()
            .map(|s| {
                s.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .ok_or_else(|| {
                        RuntimeError::Internal(super::Sealed::new(
                            "a batch produced no result".into(),
                        ))
                    })
            })
            .collect()
    }

    /// Configure one instance (and, for a featurizer, hold its declared
    /// dimension to the cap), then discard it: a bad configuration fails
    /// here, before any record is sent.
    pub fn check_configuration(&self) -> Result<(), RuntimeError> {
        // A fitted featurizer not yet fitted is checked as the fit will
        // make it: configured, not loaded.
        let purpose = if self.plugin.fitted && self.vocabulary.is_none() {
            Purpose::Fit
        } else {
            self.purpose()
        };
        match self
            .plugin
            .instantiate_logged(self.runtime, &self.config, &self.limits, purpose)
        {
            Ok(mut inst) => {
                self.collect_log(&mut inst);
                self.collect_usage(&inst);
                self.dimension.store(inst.dimension(), Ordering::Relaxed);
                Ok(())
            }
            Err(f) => Err(self.absorb(f)),
        }
    }

    /// Preprocess `records`; the kept records in input order.
    pub fn preprocess(&self, records: &[DataRecord]) -> Result<Vec<DataRecord>, RuntimeError> {
        let out = self.run(PluginKind::Preprocessor, records, |inst, batch| {
            inst.preprocess(batch)
        })?;
        Ok(out.into_iter().flatten().collect())
    }

    /// A fitted featurizer's fit over `records`: in how many records each
    /// term key occurs. Each record goes to a fresh instance that has seen
    /// no other, so a key that many records share is one each of them
    /// produced alone: an instance cannot copy what it saw in one record
    /// onto others. The counts are held per worker and merged (a sum, so
    /// the result does not depend on the schedule); more than
    /// `max_distinct` distinct keys stops the fit with
    /// [`Limit::Terms`](super::Limit::Terms), so a plugin cannot make the
    /// host hold more. All-or-nothing, like every run.
    pub fn term_counts(
        &self,
        records: &[DataRecord],
        max_distinct: usize,
    ) -> Result<TermCounts, RuntimeError> {
        self.plugin.require(PluginKind::Featurizer)?;
        if !self.plugin.fitted {
            return Err(RuntimeError::InvalidInput(
                "this plugin is not a fitted featurizer: it has no terms".into(),
            ));
        }
        let too_many = || RuntimeError::LimitExceeded(super::Limit::Terms { max: max_distinct });
        let next = AtomicUsize::new(0);
        let done: Mutex<Vec<KeyCounter>> = Mutex::new(Vec::new());
        let failures = Failures::new();
        let fail = |at: usize, e: RuntimeError| failures.fail(at, e);
        std::thread::scope(|scope| {
            for _ in 0..self.workers.min(records.len()) {
                scope.spawn(|| {
                    let mut counts = KeyCounter::default();
                    while !failures.stopped() {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(record) = records.get(at) else { break };
                        let mut inst = match self.plugin.instantiate_logged(
                            self.runtime,
                            &self.config,
                            &self.limits,
                            Purpose::Fit,
                        ) {
                            Ok(i) => i,
                            Err(f) => return fail(at, self.absorb(f)),
                        };
                        let result = inst.terms(record);
                        self.collect_log(&mut inst);
                        self.collect_usage(&inst);
                        match result {
                            Ok(keys) => {
                                if counts.add(&keys, max_distinct).is_err() {
                                    return fail(at, too_many());
                                }
                            }
                            Err(e) => return fail(at, e),
                        }
                    }
                    match counts.flush(max_distinct) {
                        Ok(()) => done.lock().unwrap_or_else(|p| p.into_inner()).push(counts),
                        Err(TooMany) => fail(records.len(), too_many()),
                    }
                });
            }
        });
        failures.first()?;
        // A sum: the order the workers finished in does not matter.
        let mut all = KeyCounter::default();
        for counts in done.into_inner().unwrap_or_else(|p| p.into_inner()) {
            all.absorb(counts, max_distinct)
                .map_err(|TooMany| too_many())?;
        }
        Ok(TermCounts {
            documents: records.len(),
            counts: all
                .into_sorted(max_distinct)
                .map_err(|TooMany| too_many())?,
        })
    }

    /// Featurize `records`: one row per record, in order.
    pub fn featurize(&self, records: &[DataRecord]) -> Result<SparseBatch, RuntimeError> {
        let parts = self.run(PluginKind::Featurizer, records, |inst, batch| {
            inst.featurize(batch)
        })?;
        let mut all = SparseBatch {
            offsets: vec![0],
            ..SparseBatch::default()
        };
        all.indices
            .reserve(parts.iter().map(|p| p.indices.len()).sum());
        all.values
            .reserve(parts.iter().map(|p| p.values.len()).sum());
        for p in &parts {
            all.extend(p);
        }
        Ok(all)
    }

    /// Decide for each prediction set, in order.
    pub fn select(
        &self,
        classes: &[String],
        items: &[PredictionSet],
    ) -> Result<Vec<Decision>, RuntimeError> {
        let out = self.run(PluginKind::Selector, items, |inst, batch| {
            inst.select(classes, batch)
        })?;
        Ok(out.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_counts_of_parts_merge_into_the_counts_of_the_whole() {
        let a = TermCounts {
            documents: 3,
            counts: vec![(1, 2), (5, 1), (9, 3)],
        };
        let b = TermCounts {
            documents: 2,
            counts: vec![(2, 1), (5, 2)],
        };
        let m = TermCounts::merge(vec![a.clone(), b.clone()], 10).expect("merges");
        assert_eq!(m.documents, 5);
        assert_eq!(m.counts, vec![(1, 2), (2, 1), (5, 3), (9, 3)]);
        // Four distinct keys do not fit a cap of three.
        let err = TermCounts::merge(vec![a, b], 3).expect_err("over the cap");
        assert_eq!(err.code(), "limit-terms");
        let none = TermCounts::merge(Vec::new(), 3).expect("nothing");
        assert_eq!((none.documents, none.counts.len()), (0, 0));
    }
}
