//! The training kernels: softmax regression and an MLP over sparse inputs.
//!
//! The input layer of both is a sparse linear map computed as gather +
//! weighted segment sum (an "embedding bag"): each row touches only the
//! weight rows of its non-zero features, so 2^18-dimensional hashed features
//! train without a dense matrix ever being built. Its gradient is written by
//! hand and applied with lazy partial row-wise Adam (only the touched rows
//! move; [`adam_row`]), with L2 weight decay. Training steps group a
//! batch's entries by input row first (`Shard`), so a row the batch's
//! records share is read and updated once per step; inference stays
//! record-major ([`SparseLinear::forward`]). Softmax regression is entirely
//! hand-written (the measured prototype ran 4–5× slower through candle's
//! generic autograd); the MLP's dense layers above the sparse one use
//! candle tensors and autograd. `tests` checks the hand-written gradients
//! against candle's autograd.

use candle_core::{DType, Device, Tensor, Var};

use cloister_types::types::SparseBatch;

/// Errors of the kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A candle operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A feature index is outside the model's input dimension. (Features
    /// come from a plugin: the index itself is never part of the message.)
    #[error("a feature index is outside the model's input dimension {dim}")]
    FeatureOutOfRange {
        /// The model's dimension.
        dim: usize,
    },
    /// Stored weights do not fit the model.
    #[error("weights: {0}")]
    Weights(String),
    /// A sparse step was given a gradient that does not fit the batch of
    /// the forward pass before it (or there was none): a bug in the
    /// training loop, refused rather than applied to the wrong rows.
    #[error(
        "a sparse step's gradient has {got} values where the batch of the forward pass before it needs {expected}"
    )]
    Unplanned {
        /// `records × out` of the planned batch (0: none planned).
        expected: usize,
        /// The gradient's length.
        got: usize,
    },
}

/// A deterministic generator (SplitMix64) for shuffling, initialisation
/// and dropout.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Adam's constants.
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// A sparse linear layer `dim → out` with lazy-Adam state.
#[derive(Debug, Clone)]
pub struct SparseLinear {
    /// Input dimension.
    pub dim: usize,
    /// Output dimension.
    pub out: usize,
    /// Row-major `dim × out`.
    pub w: Vec<f32>,
    /// `out`.
    pub b: Vec<f32>,
    /// Adam's moments, per input row `[m; out]` then the row's one `v`
    /// (partial row-wise Adam, [`adam_row`]), so a touched row's state is
    /// one contiguous block of `out + 1` floats.
    mv: Vec<f32>,
    mb: Vec<f32>,
    vb: Vec<f32>,
    t: i32,
    /// The blocks of the input rows, with their scratch (created on the
    /// first step).
    shards: Vec<Shard>,
    /// Records of the batch grouped by the last
    /// [`SparseLinear::forward_train`], for the step that follows.
    planned: Option<usize>,
}

/// Calls `$this.$method::<K>(args…)` with the output width `$k` as the
/// compile-time constant `K` for the narrowest layers (1 to 8 outputs, so
/// the inner loops over a row are unrolled), else with `K` = 0, which the
/// method reads as "use the `k` it was passed". The same sums either way.
macro_rules! by_width {
    ($k:expr, $this:ident . $method:ident ( $($arg:expr),* )) => {
        match $k {
            1 => $this.$method::<1>($($arg),*),
            2 => $this.$method::<2>($($arg),*),
            3 => $this.$method::<3>($($arg),*),
            4 => $this.$method::<4>($($arg),*),
            5 => $this.$method::<5>($($arg),*),
            6 => $this.$method::<6>($($arg),*),
            7 => $this.$method::<7>($($arg),*),
            8 => $this.$method::<8>($($arg),*),
            _ => $this.$method::<0>($($arg),*),
        }
    };
}

/// Calls `$avx2` — a twin of `$any` compiled with
/// `#[target_feature(enable = "avx2")]` around the same `#[inline(always)]`
/// body — when the CPU has AVX2, else `$any`.
macro_rules! avx2_or {
    ($avx2:expr, $any:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the one precondition of calling a function compiled
            // with `target_feature(enable = "avx2")` is that the CPU has
            // AVX2, which the line above just checked.
            #[allow(unsafe_code)]
            return unsafe { $avx2 };
        }
        $any
    }};
}

/// How many entries (forward pass) or touched rows (update) ahead the
/// loops ask for the weight rows they will need. The rows sit at random
/// places in tables larger than the cache, so without the hint every row
/// starts with a full memory latency (measured: docs/BENCHMARKS.md).
const AHEAD: usize = 6;

/// How many entries ahead [`Shard::plan`] asks for the slot of the row it
/// will look up (one `u32` each, at a random place).
const AHEAD_SLOT: usize = 16;

/// Hints the CPU to start loading `row` (all its cache lines) into the
/// cache. Only a hint: it changes no value and cannot fault.
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let line = (64 / std::mem::size_of::<T>()).max(1);
        let mut i = 0;
        while i < row.len() {
            // SAFETY: `row[i]` is in bounds (i < row.len()), so the pointer
            // is valid; `_mm_prefetch` (SSE, which every x86_64 CPU has)
            // only hints the cache hierarchy: it reads nothing into the
            // program, writes nothing, and never faults.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    (&raw const row[i]).cast::<i8>(),
                );
            }
            i += line;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// One block of the input rows, `lo..hi`: the current mini-batch's entries
/// in those rows grouped by row (feature-major), with the scratch to do the
/// block's share of the forward pass and of the update. The blocks are
/// fixed by the layer's shape, never by the number of cores, and each
/// block's work is the same sums in the same order on whichever thread
/// runs it, so a step gives the same weights bit for bit on any number of
/// cores.
///
/// Grouping by row is what makes a step cheap: a row that several records
/// of the batch share is read once for the forward pass (not once per
/// record), and its gradient is summed and applied in one visit, in
/// registers, with no gradient buffer written and read back.
#[derive(Debug, Clone, Default)]
struct Shard {
    lo: usize,
    hi: usize,
    /// Owned input rows (relative to `lo`) the batch touches, in the order
    /// the batch first touches them.
    touched: Vec<u32>,
    /// `touched[s]`'s entries are `cols[start[s]..start[s + 1]]`.
    start: Vec<u32>,
    /// (batch record, value) grouped by input row, each group in batch
    /// order.
    cols: Vec<(u32, f32)>,
    /// This block's (input row relative to `lo`, batch record, value)
    /// entries of the batch, in batch order (several blocks only).
    entries: Vec<(u32, u32, f32)>,
    /// Per entry of the batch (in batch order), its row's place in
    /// `touched`.
    loc: Vec<u32>,
    /// Where the next entry of each touched row goes in `cols`.
    fill: Vec<u32>,
    /// Per owned input row, its place in `touched` plus one (0:
    /// untouched); all zero outside [`Shard::plan`].
    slot: Vec<u32>,
    /// This block's share of the forward pass, `records × out`.
    partial: Vec<f32>,
    /// One row's gradient, `out`.
    g: Vec<f32>,
}

impl Shard {
    /// Groups the batch's entries in this block's rows by row: from the
    /// batch itself (one block) or from `entries` (several). Two passes
    /// over the entries, no sorting.
    fn plan(&mut self, x: &SparseBatch, rows: &[usize], all: bool) {
        if self.slot.len() != self.hi - self.lo {
            self.slot = vec![0; self.hi - self.lo];
        }
        self.touched.clear();
        self.start.clear();
        self.start.push(0);
        self.loc.clear();
        let entries = std::mem::take(&mut self.entries);
        // The slots sit at random places in a table the previous step's
        // rows pushed out of the cache: ask for each a few entries ahead.
        if all {
            for &row in rows {
                let idx = x.row(row).0;
                for (e, &i) in idx.iter().enumerate() {
                    if let Some(&next) = idx.get(e + AHEAD_SLOT) {
                        let n = next as usize;
                        prefetch(self.slot.get(n..n + 1).unwrap_or_default());
                    }
                    let s = self.place(i);
                    self.loc.push(s);
                }
            }
        } else {
            for (e, &(li, _, _)) in entries.iter().enumerate() {
                if let Some(&(next, _, _)) = entries.get(e + AHEAD_SLOT) {
                    let n = next as usize;
                    prefetch(self.slot.get(n..n + 1).unwrap_or_default());
                }
                let s = self.place(li);
                self.loc.push(s);
            }
        }
        for s in 1..self.start.len() {
            self.start[s] += self.start[s - 1];
        }
        self.fill.clear();
        self.fill
            .extend_from_slice(&self.start[..self.touched.len()]);
        self.cols.clear();
        self.cols.resize(self.loc.len(), (0, 0.0));
        let mut put = |e: usize, r: u32, v: f32| {
            let s = self.loc[e] as usize;
            self.cols[self.fill[s] as usize] = (r, v);
            self.fill[s] += 1;
        };
        if all {
            let mut e = 0;
            for (r, &row) in rows.iter().enumerate() {
                for &v in x.row(row).1 {
                    put(e, r as u32, v);
                    e += 1;
                }
            }
        } else {
            for (e, &(_, r, v)) in entries.iter().enumerate() {
                put(e, r, v);
            }
        }
        self.entries = entries;
        for &li in &self.touched {
            self.slot[li as usize] = 0;
        }
    }

    /// The place in `touched` of owned input row `li` (relative to `lo`),
    /// given on its first touch; counts the entry.
    #[inline(always)]
    fn place(&mut self, li: u32) -> u32 {
        let s = match self.slot[li as usize] {
            0 => {
                self.touched.push(li);
                self.start.push(0);
                self.slot[li as usize] = self.touched.len() as u32;
                self.touched.len() - 1
            }
            s => s as usize - 1,
        };
        self.start[s + 1] += 1;
        s as u32
    }

    /// This block's share of the forward pass into `partial`: each touched
    /// row of `w` (this block's rows) is read once and added, times each
    /// entry's value, to its records.
    fn forward(&mut self, w: &[f32], records: usize, k: usize) {
        avx2_or!(
            self.forward_avx2(w, records, k),
            self.forward_any(w, records, k)
        )
    }

    /// [`Shard::forward`] compiled with AVX2: the same operations in the
    /// same order on wider vectors, so the same sums bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn forward_avx2(&mut self, w: &[f32], records: usize, k: usize) {
        self.forward_any(w, records, k)
    }

    #[inline(always)]
    fn forward_any(&mut self, w: &[f32], records: usize, k: usize) {
        // The narrowest layers (a few classes) get the output width as a
        // constant, so the inner loop is unrolled; the sums are the same.
        by_width!(k, self.forward_k(w, records, k))
    }

    /// [`Shard::forward`] for output width `K` (0: `k`, not constant).
    #[inline(always)]
    fn forward_k<const K: usize>(&mut self, w: &[f32], records: usize, k: usize) {
        let k = if K == 0 { k } else { K };
        self.partial.clear();
        self.partial.resize(records * k, 0.0);
        for (s, &li) in self.touched.iter().enumerate() {
            if let Some(&next) = self.touched.get(s + AHEAD) {
                let n = next as usize * k;
                prefetch(w.get(n..n + k).unwrap_or_default());
            }
            let wr = &w[li as usize * k..(li as usize + 1) * k];
            let col = &self.cols[self.start[s] as usize..self.start[s + 1] as usize];
            for &(r, v) in col {
                let r = r as usize;
                for (p, w) in self.partial[r * k..(r + 1) * k].iter_mut().zip(wr) {
                    *p += v * w;
                }
            }
        }
    }

    /// Sums each touched row's gradient over its entries, in batch order,
    /// and applies Adam to the row at once; `w` and `mv` are this block's
    /// rows only.
    fn update(
        &mut self,
        w: &mut [f32],
        mv: &mut [f32],
        grad: &[f32],
        k: usize,
        a: Adam,
        grad_w: Option<&mut std::collections::BTreeMap<u32, Vec<f32>>>,
    ) {
        avx2_or!(
            self.update_avx2(w, mv, grad, k, a, grad_w),
            self.update_any(w, mv, grad, k, a, grad_w)
        )
    }

    /// [`Shard::update`] compiled with AVX2 (the same IEEE operations in
    /// the same order, eight lanes at a time: the same weights bit for bit).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn update_avx2(
        &mut self,
        w: &mut [f32],
        mv: &mut [f32],
        grad: &[f32],
        k: usize,
        a: Adam,
        grad_w: Option<&mut std::collections::BTreeMap<u32, Vec<f32>>>,
    ) {
        self.update_any(w, mv, grad, k, a, grad_w)
    }

    #[inline(always)]
    fn update_any(
        &mut self,
        w: &mut [f32],
        mv: &mut [f32],
        grad: &[f32],
        k: usize,
        a: Adam,
        grad_w: Option<&mut std::collections::BTreeMap<u32, Vec<f32>>>,
    ) {
        by_width!(k, self.update_k(w, mv, grad, k, a, grad_w))
    }

    /// [`Shard::update`] for output width `K` (0: `k`, not constant).
    #[inline(always)]
    fn update_k<const K: usize>(
        &mut self,
        w: &mut [f32],
        mv: &mut [f32],
        grad: &[f32],
        k: usize,
        a: Adam,
        mut grad_w: Option<&mut std::collections::BTreeMap<u32, Vec<f32>>>,
    ) {
        let k = if K == 0 { k } else { K };
        self.g.resize(k, 0.0);
        let g = &mut self.g[..k];
        for (s, &li) in self.touched.iter().enumerate() {
            if let Some(&next) = self.touched.get(s + AHEAD) {
                let base = next as usize * k;
                prefetch(w.get(base..base + k).unwrap_or_default());
                let state = next as usize * (k + 1);
                prefetch(mv.get(state..state + k + 1).unwrap_or_default());
            }
            g.fill(0.0);
            for &(r, v) in &self.cols[self.start[s] as usize..self.start[s + 1] as usize] {
                let r = r as usize;
                for (g, d) in g.iter_mut().zip(&grad[r * k..(r + 1) * k]) {
                    *g += v * d;
                }
            }
            if let Some(map) = grad_w.as_deref_mut() {
                map.insert((li as usize + self.lo) as u32, g.to_vec());
            }
            let base = li as usize * k;
            let state = li as usize * (k + 1);
            let (m, v) = mv[state..state + k + 1].split_at_mut(k);
            adam_row(&mut w[base..base + k], m, &mut v[0], g, a);
        }
    }
}

/// Layers narrower than this train on one block, on one core: the split
/// only pays when each touched row has enough outputs to update
/// (measured: 2 classes lose 45% on two shards, 20 classes gain 10%, 128
/// hidden units 90%; docs/BENCHMARKS.md).
const PARALLEL_MIN_OUT: usize = 16;

/// Blocks of a wide layer. Fixed, so that the forward pass's partial sums,
/// and so the weights, do not depend on the number of cores; enough for
/// up to 8 cores.
const BLOCKS: usize = 8;

/// The blocks of a layer of `dim` input rows and `out` outputs: `BLOCKS`,
/// or one for small or narrow layers.
fn shards(dim: usize, out: usize) -> Vec<Shard> {
    shards_of(dim, if splits(dim, out) { BLOCKS } else { 1 })
}

/// Whether a layer of `dim` input rows and `out` outputs is cut into
/// blocks that the cores share (else one core does its steps).
fn splits(dim: usize, out: usize) -> bool {
    dim >= 4096 && out >= PARALLEL_MIN_OUT
}

/// `n` blocks of `dim` input rows, by range.
fn shards_of(dim: usize, n: usize) -> Vec<Shard> {
    (0..n)
        .map(|j| Shard {
            lo: dim * j / n,
            hi: dim * (j + 1) / n,
            ..Shard::default()
        })
        .collect()
}

impl SparseLinear {
    /// Zero weights (softmax regression), or small uniform ones when `rng`
    /// is given (hidden layers).
    pub fn new(dim: usize, out: usize, rng: Option<&mut Rng>) -> Self {
        let mut w = vec![0f32; dim * out];
        if let Some(rng) = rng {
            // Each row sums about 400 features: keep pre-activations O(1).
            let scale = 0.05f32;
            for x in &mut w {
                *x = (rng.unit() * 2.0 - 1.0) * scale;
            }
        }
        Self {
            dim,
            out,
            w,
            b: vec![0.0; out],
            mv: Vec::new(),
            mb: vec![0.0; out],
            vb: vec![0.0; out],
            t: 0,
            shards: Vec::new(),
            planned: None,
        }
    }

    /// Whether this layer's training steps share their work among the
    /// cores (a wide layer, cut into blocks), or run on one.
    pub fn splits(&self) -> bool {
        splits(self.dim, self.out)
    }

    /// Drops the optimizer's state and scratch (training is over; the
    /// weights stay).
    pub fn finish(&mut self) {
        self.mv = Vec::new();
        self.shards = Vec::new();
        self.planned = None;
    }

    /// Checks every feature index of `x` against the input dimension.
    pub fn check(&self, x: &SparseBatch) -> Result<(), KernelError> {
        if x.indices.iter().any(|&i| i as usize >= self.dim) {
            Err(KernelError::FeatureOutOfRange { dim: self.dim })
        } else {
            Ok(())
        }
    }

    /// `out[r] = b + Σ v · W[idx]` for the given rows of `x`, the rows
    /// split over the cores (each row's sum is computed the same way
    /// whatever the split).
    pub fn forward(&self, x: &SparseBatch, rows: &[usize], out: &mut Vec<f32>) {
        use rayon::prelude::*;
        let k = self.out;
        out.clear();
        out.resize(rows.len() * k, 0.0);
        // Small batches of narrow layers are not worth a second core.
        if rows.len() * k < 64 * PARALLEL_MIN_OUT {
            return self.forward_rows(x, rows, out);
        }
        let threads = rayon::current_num_threads().max(1);
        let chunk = rows.len().div_ceil(threads).max(16);
        out.par_chunks_mut(chunk * k)
            .zip(rows.par_chunks(chunk))
            .for_each(|(out, rows)| self.forward_rows(x, rows, out));
    }

    fn forward_rows(&self, x: &SparseBatch, rows: &[usize], out: &mut [f32]) {
        avx2_or!(
            self.forward_rows_avx2(x, rows, out),
            self.forward_rows_any(x, rows, out)
        )
    }

    /// [`SparseLinear::forward_rows`] compiled with AVX2 (same operations,
    /// same order, same results).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn forward_rows_avx2(&self, x: &SparseBatch, rows: &[usize], out: &mut [f32]) {
        self.forward_rows_any(x, rows, out)
    }

    #[inline(always)]
    fn forward_rows_any(&self, x: &SparseBatch, rows: &[usize], out: &mut [f32]) {
        let k = self.out;
        for (o, &row) in out.chunks_exact_mut(k).zip(rows) {
            o.copy_from_slice(&self.b);
            let (idx, val) = x.row(row);
            for &i in idx.iter().take(AHEAD) {
                prefetch(
                    self.w
                        .get(i as usize * k..(i as usize + 1) * k)
                        .unwrap_or_default(),
                );
            }
            for (j, (&i, &v)) in idx.iter().zip(val).enumerate() {
                if let Some(&next) = idx.get(j + AHEAD) {
                    let n = next as usize * k;
                    prefetch(self.w.get(n..n + k).unwrap_or_default());
                }
                let wr = &self.w[i as usize * k..(i as usize + 1) * k];
                for (o, w) in o.iter_mut().zip(wr) {
                    *o += v * w;
                }
            }
        }
    }

    /// The forward pass of a training step: `out[r] = b + Σ v · W[idx]` for
    /// the given rows of `x`, as [`SparseLinear::forward`] computes it but
    /// feature-major: the batch's entries are grouped by input row (per
    /// block of rows, the blocks on the cores), each touched row is read
    /// once, and the blocks' partial sums are added in block order. The
    /// grouping is kept for the [`SparseLinear::step`] that follows. The
    /// sums are rounded in another order than [`SparseLinear::forward`]'s,
    /// so the two can differ in the last bits; each is the same on any
    /// number of cores.
    pub fn forward_train(&mut self, x: &SparseBatch, rows: &[usize], out: &mut Vec<f32>) {
        use rayon::prelude::*;
        let k = self.out;
        if self.shards.is_empty() {
            self.shards = shards(self.dim, self.out);
        }
        // With several blocks, one pass hands each its entries, in batch
        // order (so every row's group keeps the batch order).
        let all = self.shards.len() == 1;
        if !all {
            let width = self.dim.div_ceil(self.shards.len());
            for shard in &mut self.shards {
                shard.entries.clear();
            }
            for (r, &row) in rows.iter().enumerate() {
                let (idx, val) = x.row(row);
                for (&i, &v) in idx.iter().zip(val) {
                    let mut j = (i as usize / width.max(1)).min(self.shards.len() - 1);
                    // The ranges are dim·j/n..dim·(j+1)/n; step to the owner.
                    while (i as usize) < self.shards[j].lo {
                        j -= 1;
                    }
                    while (i as usize) >= self.shards[j].hi {
                        j += 1;
                    }
                    let shard = &mut self.shards[j];
                    shard
                        .entries
                        .push(((i as usize - shard.lo) as u32, r as u32, v));
                }
            }
        }
        let (w, records) = (&self.w, rows.len());
        let block = |shard: &mut Shard| {
            shard.plan(x, rows, all);
            shard.forward(&w[shard.lo * k..shard.hi * k], records, k);
        };
        if all {
            self.shards.iter_mut().for_each(block);
        } else {
            self.shards.par_iter_mut().for_each(block);
        }
        out.clear();
        for _ in 0..records {
            out.extend_from_slice(&self.b);
        }
        for shard in &self.shards {
            for (o, p) in out.iter_mut().zip(&shard.partial) {
                *o += p;
            }
        }
        self.planned = Some(records);
    }

    /// Backpropagates `grad` (`records × out` for the batch of the
    /// [`SparseLinear::forward_train`] just before, already averaged over
    /// the batch) and applies one lazy-Adam step with L2 decay `l2` to the
    /// touched rows and the bias. Each touched row's gradient is summed
    /// over its entries in batch order and applied in the same visit; the
    /// blocks run on the cores, and the result does not depend on how
    /// many. With `grad_w`, also returns the raw gradient of W for the
    /// touched rows (tests only; then one core does it all).
    pub fn step(
        &mut self,
        grad: &[f32],
        lr: f32,
        l2: f32,
        mut grad_w: Option<&mut std::collections::BTreeMap<u32, Vec<f32>>>,
    ) -> Result<(), KernelError> {
        use rayon::prelude::*;
        let k = self.out;
        let planned = self.planned.take();
        let records = match planned {
            Some(n) if grad.len() == n * k => n,
            _ => {
                return Err(KernelError::Unplanned {
                    expected: planned.map_or(0, |n| n * k),
                    got: grad.len(),
                });
            }
        };
        if self.mv.is_empty() {
            self.mv = vec![0.0; self.dim * (k + 1)];
        }
        self.t += 1;
        let adam = Adam::new(lr, l2, self.t);
        let (c1, c2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
        // Each block with its own rows of the weights and moments.
        let mut jobs = Vec::with_capacity(self.shards.len());
        let (mut w_rest, mut mv_rest) = (&mut self.w[..], &mut self.mv[..]);
        for shard in &mut self.shards {
            let n = (shard.hi - shard.lo) * k;
            let (w, w_next) = std::mem::take(&mut w_rest).split_at_mut(n);
            let (mv, mv_next) =
                std::mem::take(&mut mv_rest).split_at_mut((shard.hi - shard.lo) * (k + 1));
            (w_rest, mv_rest) = (w_next, mv_next);
            jobs.push((shard, w, mv));
        }
        if grad_w.is_some() || jobs.len() == 1 {
            for (shard, w, mv) in jobs {
                shard.update(w, mv, grad, k, adam, grad_w.as_deref_mut());
            }
        } else {
            jobs.into_par_iter().for_each(|(shard, w, mv)| {
                shard.update(w, mv, grad, k, adam, None);
            });
        }
        for c in 0..k {
            let gb: f32 = (0..records).map(|r| grad[r * k + c]).sum();
            self.mb[c] = BETA1 * self.mb[c] + (1.0 - BETA1) * gb;
            self.vb[c] = BETA2 * self.vb[c] + (1.0 - BETA2) * gb * gb;
            self.b[c] -= lr * (self.mb[c] / c1) / ((self.vb[c] / c2).sqrt() + EPS);
        }
        Ok(())
    }
}

/// GFLOP/s of an `n × n × n` f32 matrix product on the compute device
/// (the dense layers' path), best of three: the machine's dense limit that
/// the benchmarks set the kernels' figures against.
pub fn dense_matmul_gflops(n: usize) -> Result<f64, KernelError> {
    let dev = compute_device();
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best.max(1e-12) / 1e9)
}

/// One Adam step's settings: L2 decay, and the step size and bias
/// corrections folded together once per step (see [`adam_row`]).
#[derive(Debug, Clone, Copy)]
struct Adam {
    l2: f32,
    /// `lr / (1 - β1^t)`.
    step: f32,
    /// `1 / sqrt(1 - β2^t)`.
    inv_sqrt_c2: f32,
}

impl Adam {
    fn new(lr: f32, l2: f32, t: i32) -> Self {
        let c1 = 1.0 - BETA1.powi(t);
        let c2 = 1.0 - BETA2.powi(t);
        Adam {
            l2,
            step: lr / c1,
            inv_sqrt_c2: 1.0 / c2.sqrt(),
        }
    }
}

/// One step of partial row-wise Adam over a row of weights: the first
/// moment per weight as in Adam, the second moment one per row — the
/// running mean of the row's squared gradient, so every weight of a row
/// takes the same adaptive step size. This is the optimizer large
/// embedding tables are trained with (FBGEMM's `PARTIAL_ROWWISE_ADAM`):
/// a touched row moves `out + 1` floats of state instead of `2 · out`,
/// and takes one square root instead of one per weight. On the sparse
/// layer the update's time goes to reaching each touched row's state at a
/// random place, not to arithmetic (docs/BENCHMARKS.md), so the smaller
/// state and the lighter per-weight work are the speed. The textbook bias
/// corrections are folded into the per-step constants ([`Adam::new`]):
/// `w -= (lr / c1) · m / (sqrt(v) · (1 / sqrt(c2)) + ε)`.
#[inline(always)]
fn adam_row(w: &mut [f32], m: &mut [f32], v: &mut f32, g: &[f32], a: Adam) {
    let n = w.len().min(m.len()).min(g.len());
    let (w, m, g) = (&mut w[..n], &mut m[..n], &g[..n]);
    let sq = if n >= LANES_MIN {
        squares_in_lanes(w, g, a.l2)
    } else {
        let mut sq = 0f32;
        for j in 0..n {
            let gc = g[j] + a.l2 * w[j];
            sq += gc * gc;
        }
        sq
    };
    *v = BETA2 * *v + (1.0 - BETA2) * (sq / n.max(1) as f32);
    let step = a.step / (v.sqrt() * a.inv_sqrt_c2 + EPS);
    for j in 0..n {
        let gc = g[j] + a.l2 * w[j];
        m[j] = BETA1 * m[j] + (1.0 - BETA1) * gc;
        w[j] -= step * m[j];
    }
}

/// Rows at least this wide sum their squared gradients in lanes
/// ([`squares_in_lanes`]); narrower ones in one running sum, which
/// measured faster at 2 and 20 outputs (docs/BENCHMARKS.md).
const LANES_MIN: usize = 32;

/// `Σ (g_j + l2 · w_j)²` summed in eight lanes (entry j into lane j % 8),
/// the lanes then added in a fixed tree: a chain of additions an eighth as
/// long as one running sum, which the CPU keeps in one vector register.
/// The order depends only on the row's width, so the value is the same on
/// every CPU, instruction set and number of cores.
#[inline(always)]
fn squares_in_lanes(w: &[f32], g: &[f32], l2: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (wc, wt) = w.as_chunks::<8>();
    let (gc, gt) = g.as_chunks::<8>();
    for (wc, gc) in wc.iter().zip(gc) {
        for l in 0..8 {
            let d = gc[l] + l2 * wc[l];
            lanes[l] += d * d;
        }
    }
    for (l, (w, g)) in wt.iter().zip(gt).enumerate() {
        let d = g + l2 * w;
        lanes[l] += d * d;
    }
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
}

/// Softmax in place over rows of width `k`; returns the weighted mean
/// cross-entropy and turns `logits` into `(p - onehot) · w_i / Σw`, the
/// gradient of that loss with respect to the logits.
pub fn softmax_xent_grad(logits: &mut [f32], k: usize, labels: &[usize], weights: &[f32]) -> f32 {
    let total: f32 = weights.iter().sum::<f32>().max(f32::MIN_POSITIVE);
    let mut loss = 0f32;
    for (r, row) in logits.chunks_mut(k).enumerate() {
        softmax(row);
        let y = labels[r];
        loss -= weights[r] * row[y].max(1e-12).ln();
        let s = weights[r] / total;
        for (c, p) in row.iter_mut().enumerate() {
            *p = (*p - if c == y { 1.0 } else { 0.0 }) * s;
        }
    }
    loss / total
}

/// Numerically stable softmax of one row, in place.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for p in row.iter_mut() {
        *p = (*p - max).exp();
        sum += *p;
    }
    for p in row.iter_mut() {
        *p /= sum;
    }
}

/// Where the dense layers run: the first CUDA GPU when built with the `cuda`
/// feature and one is present, else the CPU. (The sparse input layer is CPU
/// code either way.)
///
/// The device is opened once per process and shared: every candle CUDA
/// device carries its own id, context handle and cuBLAS handle, and tensors
/// of two different ones cannot meet in one operation, so opening one per
/// call would both waste seconds and fail the first matrix product.
pub fn compute_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            if !cfg!(feature = "cuda") {
                return Device::Cpu;
            }
            match Device::cuda_if_available(0) {
                Ok(Device::Cpu) => {
                    tracing::info!("built with CUDA but no GPU found: dense layers on the CPU");
                    Device::Cpu
                }
                Ok(dev) => {
                    tracing::info!("dense layers on CUDA GPU 0");
                    dev
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA GPU 0 failed to open: dense layers on the CPU");
                    Device::Cpu
                }
            }
        })
        .clone()
}

/// Fixes, for the whole process, how many threads candle's CPU matrix
/// products use: as many as the rest of training (rayon's pool), that is
/// `RAYON_NUM_THREADS` when it is set to a positive number, else the
/// logical CPUs.
///
/// Why: candle (0.11) works the number out again on every CPU matrix
/// product, and unless `RAYON_NUM_THREADS` is set that means opening,
/// reading and parsing `/proc/cpuinfo` (`num_cpus::get_physical`) — a
/// few system calls and a page of kernel-formatted text per product. An
/// `mlp` step does several products, so on 20 Newsgroups this cost about a
/// tenth of every epoch (measured: docs/BENCHMARKS.md, "candle's thread
/// count, read once"). With the variable set, candle reads it instead, and
/// rayon, which reads the same variable, builds the pool it would have
/// built anyway. Child processes inherit the value, so a worker or a
/// `serve` replica started from here sizes its pool the same way.
///
/// Where the machine has more logical CPUs than cores (SMT), candle's
/// products now use the logical count, like the sparse layers; the values
/// they compute do not depend on it.
///
/// # Safety
///
/// Writes the process environment, which is only sound while no other
/// thread can read or write it: call it first thing in `main`, before
/// anything starts a thread.
#[allow(unsafe_code)]
pub unsafe fn settle_thread_count() {
    let set = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    if set {
        return;
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: the caller guarantees that no other thread exists yet (this
    // function's contract), so nothing reads or writes the environment
    // while it changes.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}

/// The dense part of an MLP: hidden layers after the first, then the output
/// layer, as candle variables trained with Adam through candle's autograd.
#[derive(Debug)]
pub struct DenseStack {
    /// `(weight [in, out], bias [out])` per layer, last = output layer.
    pub layers: Vec<(Var, Var)>,
    adam: Vec<[Tensor; 4]>,
    dev: Device,
    t: i32,
}

impl DenseStack {
    /// Layers of the given widths (`widths[0]` is the input).
    pub fn new(widths: &[usize], rng: &mut Rng) -> Result<Self, KernelError> {
        let dev = compute_device();
        let mut layers = Vec::new();
        let mut adam = Vec::new();
        for pair in widths.windows(2) {
            let (i, o) = (pair[0], pair[1]);
            let scale = (6.0 / (i + o) as f32).sqrt();
            let w: Vec<f32> = (0..i * o)
                .map(|_| (rng.unit() * 2.0 - 1.0) * scale)
                .collect();
            let w = Var::from_tensor(&Tensor::from_vec(w, (i, o), &dev)?)?;
            let b = Var::from_tensor(&Tensor::zeros(o, DType::F32, &dev)?)?;
            adam.push([
                Tensor::zeros((i, o), DType::F32, &dev)?,
                Tensor::zeros((i, o), DType::F32, &dev)?,
                Tensor::zeros(o, DType::F32, &dev)?,
                Tensor::zeros(o, DType::F32, &dev)?,
            ]);
            layers.push((w, b));
        }
        Ok(Self {
            layers,
            adam,
            dev,
            t: 0,
        })
    }

    /// Forward pass: ReLU between layers, logits out.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor, KernelError> {
        let mut a = h.clone();
        let last = self.layers.len() - 1;
        for (n, (w, b)) in self.layers.iter().enumerate() {
            a = a.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            if n < last {
                a = a.relu()?;
            }
        }
        Ok(a)
    }

    /// One training step on input activations `h` (`batch × width`):
    /// weighted cross-entropy, backward, Adam with L2. Returns the loss and
    /// the gradient with respect to `h`.
    pub fn step(
        &mut self,
        h: &[f32],
        batch: usize,
        labels: &[usize],
        weights: &[f32],
        lr: f32,
        l2: f32,
    ) -> Result<(f32, Vec<f32>), KernelError> {
        let dev = &self.dev;
        let width = h.len() / batch.max(1);
        let hv = Var::from_tensor(&Tensor::from_slice(h, (batch, width), dev)?)?;
        let logits = self.forward(hv.as_tensor())?;
        let k = logits.dim(1)?;
        let total: f32 = weights.iter().sum::<f32>().max(f32::MIN_POSITIVE);
        let mut target = vec![0f32; batch * k];
        for (r, &y) in labels.iter().enumerate() {
            target[r * k + y] = weights[r] / total;
        }
        let target = Tensor::from_vec(target, (batch, k), dev)?;
        let lse = logits.log_sum_exp(1)?.unsqueeze(1)?;
        let logp = logits.broadcast_sub(&lse)?;
        let loss = (logp * target)?.sum_all()?.neg()?;
        let grads = loss.backward()?;
        self.t += 1;
        let (c1, c2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
        for ((w, b), st) in self.layers.iter().zip(self.adam.iter_mut()) {
            for (n, (var, decay)) in [(w, l2), (b, 0.0)].into_iter().enumerate() {
                let Some(g) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let g = (g + (var.as_tensor() * f64::from(decay))?)?;
                let m = ((&st[2 * n] * f64::from(BETA1))? + (&g * f64::from(1.0 - BETA1))?)?;
                let v =
                    ((&st[2 * n + 1] * f64::from(BETA2))? + (g.sqr()? * f64::from(1.0 - BETA2))?)?;
                let update =
                    ((&m / f64::from(c1))? / ((&v / f64::from(c2))?.sqrt()? + f64::from(EPS))?)?;
                var.set(&(var.as_tensor() - (update * f64::from(lr))?)?)?;
                st[2 * n] = m;
                st[2 * n + 1] = v;
            }
        }
        let dh = grads
            .get(hv.as_tensor())
            .map(|g| g.flatten_all().and_then(|g| g.to_vec1::<f32>()))
            .transpose()?
            .unwrap_or_else(|| vec![0.0; h.len()]);
        Ok((loss.to_scalar::<f32>()?, dh))
    }

    /// The device the layers live on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Probabilities for input activations.
    pub fn predict(&self, h: &[f32], batch: usize) -> Result<Vec<f32>, KernelError> {
        let width = h.len() / batch.max(1);
        let logits = self.forward(&Tensor::from_slice(h, (batch, width), &self.dev)?)?;
        let mut out = logits.flatten_all()?.to_vec1::<f32>()?;
        let k = out.len() / batch.max(1);
        for row in out.chunks_mut(k.max(1)) {
            softmax(row);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn batch() -> SparseBatch {
        SparseBatch {
            offsets: vec![0, 2, 3, 6],
            indices: vec![0, 3, 1, 0, 2, 4],
            values: vec![1.0, 0.5, 2.0, -1.0, 0.25, 1.5],
        }
    }

    #[test]
    fn the_hand_written_sparse_gradient_matches_candle_autograd() -> Result<(), KernelError> {
        // A constant width (3, 8) and a general one (20).
        for k in [3, 8, 20] {
            gradient_check(k)?;
        }
        Ok(())
    }

    #[test]
    fn the_gradient_of_a_layer_in_several_blocks_matches_candle_autograd() -> Result<(), KernelError>
    {
        // 5,000 input rows and 20 outputs: the layer is split into blocks,
        // and the batch's features fall into four of them.
        gradient_check_spread(20, 5000, 1000)
    }

    fn gradient_check(k: usize) -> Result<(), KernelError> {
        gradient_check_spread(k, 5, 1)
    }

    /// [`batch`]'s features times `spread`, in a layer of `dim` inputs.
    fn gradient_check_spread(k: usize, dim: usize, spread: u32) -> Result<(), KernelError> {
        let mut x = batch();
        x.indices.iter_mut().for_each(|i| *i *= spread);
        let labels = [2usize, 0, k - 1];
        let mut rng = Rng::new(7);
        let mut layer = SparseLinear::new(dim, k, Some(&mut rng));
        let weights = [1.0f32, 2.0, 0.5];
        let rows = [0usize, 1, 2];
        let mut logits = Vec::new();
        layer.forward_train(&x, &rows, &mut logits);
        softmax_xent_grad(&mut logits, k, &labels, &weights);
        let mut grad_w = BTreeMap::new();
        let before = layer.w.clone();
        layer.step(&logits, 0.0, 0.0, Some(&mut grad_w))?;

        // The same loss, dense, through candle's autograd.
        let dev = Device::Cpu;
        let mut dense = vec![0f32; 3 * dim];
        for r in 0..3 {
            let (idx, val) = x.row(r);
            for (&i, &v) in idx.iter().zip(val) {
                dense[r * dim + i as usize] += v;
            }
        }
        let xt = Tensor::from_vec(dense, (3, dim), &dev)?;
        let w = Var::from_tensor(&Tensor::from_vec(before, (dim, k), &dev)?)?;
        let logits = xt.matmul(w.as_tensor())?;
        let lse = logits.log_sum_exp(1)?.unsqueeze(1)?;
        let logp = logits.broadcast_sub(&lse)?;
        let total: f32 = weights.iter().sum();
        let mut target = vec![0f32; 3 * k];
        for (r, &y) in labels.iter().enumerate() {
            target[r * k + y] = weights[r] / total;
        }
        let loss = (logp * Tensor::from_vec(target, (3, k), &dev)?)?
            .sum_all()?
            .neg()?;
        let g = loss
            .backward()?
            .get(w.as_tensor())
            .expect("gradient")
            .to_vec2::<f32>()?;
        for (i, row) in g.iter().enumerate() {
            let hand = grad_w
                .get(&(i as u32))
                .cloned()
                .unwrap_or_else(|| vec![0.0; k]);
            for c in 0..k {
                assert!(
                    (hand[c] - row[c]).abs() < 1e-5,
                    "w[{i},{c}]: {} vs {}",
                    hand[c],
                    row[c]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_sparse_step_is_partial_row_wise_adam_as_written_in_the_textbook_form() {
        // Three steps of one layer through `step`, against the update
        // written out in f64 the unfolded way: per weight
        // m ← β1·m + (1−β1)·g, per row v ← β2·v + (1−β2)·mean(g²), and
        // w ← w − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + ε), with
        // g = raw gradient + l2·w. A narrow layer sums a row's squares in
        // one running sum, a wide one (37 = four chunks of eight and a
        // tail of five) in lanes.
        for k in [3usize, 37] {
            textbook_steps(k);
        }
    }

    fn textbook_steps(k: usize) {
        let (dim, lr, l2) = (5usize, 0.05f32, 0.01f32);
        assert!(
            k < LANES_MIN || !k.is_multiple_of(8),
            "the lanes' tail is covered"
        );
        let x = batch();
        let rows = [0usize, 1, 2];
        let mut rng = Rng::new(11);
        let mut layer = SparseLinear::new(dim, k, Some(&mut rng));
        let mut w: Vec<f64> = layer.w.iter().map(|&v| f64::from(v)).collect();
        let mut m = vec![0f64; dim * k];
        let mut v = vec![0f64; dim];
        for t in 1..=3 {
            let grad: Vec<f32> = (0..rows.len() * k).map(|_| rng.unit() - 0.5).collect();
            let mut raw = BTreeMap::new();
            layer.forward_train(&x, &rows, &mut Vec::new());
            layer
                .step(&grad, lr, l2, Some(&mut raw))
                .expect("a step after its forward pass");
            let (b1, b2) = (f64::from(BETA1), f64::from(BETA2));
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            for (&row, g) in &raw {
                let row = row as usize;
                let gc: Vec<f64> = (0..k)
                    .map(|j| f64::from(g[j]) + f64::from(l2) * w[row * k + j])
                    .collect();
                let mean_sq = gc.iter().map(|g| g * g).sum::<f64>() / k as f64;
                v[row] = b2 * v[row] + (1.0 - b2) * mean_sq;
                for (j, &gc) in gc.iter().enumerate() {
                    let i = row * k + j;
                    m[i] = b1 * m[i] + (1.0 - b1) * gc;
                    w[i] -= f64::from(lr) * (m[i] / c1) / ((v[row] / c2).sqrt() + f64::from(EPS));
                }
            }
            for (i, (&got, &want)) in layer.w.iter().zip(&w).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * want.abs() + 1e-6,
                    "width {k}, step {t}, weight {i}: {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn the_avx2_copies_of_the_hot_loops_give_the_portable_results_bit_for_bit() {
        // Whatever this CPU runs through the dispatching entry points must
        // equal the portable bodies exactly: same operations, same order.
        let mut rng = Rng::new(3);
        for k in [2, 20, 128] {
            let dim = 300;
            let mut layer = SparseLinear::new(dim, k, Some(&mut rng));
            let mut x = SparseBatch {
                offsets: vec![0],
                indices: Vec::new(),
                values: Vec::new(),
            };
            for _ in 0..32 {
                let mut idx: Vec<u32> = (0..9).map(|_| (rng.next_u64() % 300) as u32).collect();
                idx.sort_unstable();
                idx.dedup();
                for i in idx {
                    x.indices.push(i);
                    x.values.push(rng.unit() - 0.5);
                }
                x.offsets.push(x.indices.len() as u32);
            }
            let rows: Vec<usize> = (0..32).collect();
            let mut fast = vec![0.0; 32 * k];
            let mut portable = vec![0.0; 32 * k];
            layer.forward_rows(&x, &rows, &mut fast);
            layer.forward_rows_any(&x, &rows, &mut portable);
            assert_eq!(bits(&fast), bits(&portable), "forward, k = {k}");

            let grad: Vec<f32> = (0..32 * k).map(|_| rng.unit() - 0.5).collect();
            let adam = Adam::new(0.01, 1e-4, 3);
            let mv: Vec<f32> = (0..dim * (k + 1)).map(|_| rng.unit() * 0.01).collect();
            let (mut w1, mut mv1) = (layer.w.clone(), mv.clone());
            let (mut w2, mut mv2) = (layer.w.clone(), mv);
            let mut a = shards_of(dim, 1).remove(0);
            a.plan(&x, &rows, true);
            let mut b = a.clone();
            a.forward(&layer.w, rows.len(), k);
            b.forward_any(&layer.w, rows.len(), k);
            assert_eq!(
                bits(&a.partial),
                bits(&b.partial),
                "grouped forward, k = {k}"
            );
            a.update(&mut w1, &mut mv1, &grad, k, adam, None);
            b.update_any(&mut w2, &mut mv2, &grad, k, adam, None);
            assert_eq!(bits(&w1), bits(&w2), "weights, k = {k}");
            assert_eq!(bits(&mv1), bits(&mv2), "moments, k = {k}");
            layer.b.iter_mut().for_each(|b| *b += 0.1);
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn the_weights_are_the_same_bit_for_bit_on_any_number_of_cores() {
        // 64 records of 12 features out of 5,000 (many shared), 2 outputs
        // (one block, constant width), 20 (eight blocks, general width) and
        // 37 (eight blocks, the row sums in lanes).
        for k in [2, 20, 37] {
            same_on_any_cores(k);
        }
    }

    fn same_on_any_cores(k: usize) {
        let dim = 5000;
        let mut rng = Rng::new(3);
        let mut x = SparseBatch {
            offsets: vec![0],
            indices: Vec::new(),
            values: Vec::new(),
        };
        let mut labels = Vec::new();
        for r in 0..64 {
            let mut idx: Vec<u32> = (0..12)
                .map(|_| (rng.next_u64() % if r % 2 == 0 { 50 } else { 5000 }) as u32)
                .collect();
            idx.sort_unstable();
            idx.dedup();
            x.values.extend(idx.iter().map(|_| rng.unit() - 0.5));
            x.indices.extend(idx);
            x.offsets.push(x.indices.len() as u32);
            labels.push(r % k);
        }
        let weights = vec![1.0f32; 16];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            pool.install(|| {
                let mut layer = SparseLinear::new(dim, k, Some(&mut Rng::new(9)));
                let (mut logits, mut inference) = (Vec::new(), Vec::new());
                for step in 0..12 {
                    let rows: Vec<usize> = (0..16).map(|j| (step * 16 + j * 5) % 64).collect();
                    layer.forward_train(&x, &rows, &mut logits);
                    // The grouped sums are the record-major ones up to
                    // rounding.
                    layer.forward(&x, &rows, &mut inference);
                    for (a, b) in logits.iter().zip(&inference) {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} against {b}");
                    }
                    let y: Vec<usize> = rows.iter().map(|&r| labels[r]).collect();
                    softmax_xent_grad(&mut logits, k, &y, &weights);
                    layer
                        .step(&logits, 0.01, 1e-4, None)
                        .expect("a step after its forward pass");
                }
                assert_eq!(
                    layer.shards.len(),
                    if k < PARALLEL_MIN_OUT { 1 } else { BLOCKS }
                );
                layer.w
            })
        };
        let one = run(1);
        for n in [2, 3, 8] {
            let many = run(n);
            assert!(
                one.iter()
                    .zip(&many)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{n} threads, {k} outputs"
            );
        }
    }

    #[test]
    fn a_step_needs_the_forward_pass_of_its_batch() {
        let x = batch();
        let mut layer = SparseLinear::new(5, 3, None);
        let err = layer.step(&[0.0; 9], 0.1, 0.0, None).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Unplanned {
                    expected: 0,
                    got: 9
                }
            ),
            "{err}"
        );
        layer.forward_train(&x, &[0, 1], &mut Vec::new());
        let err = layer.step(&[0.0; 9], 0.1, 0.0, None).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Unplanned {
                    expected: 6,
                    got: 9
                }
            ),
            "{err}"
        );
        // Refused steps move nothing.
        assert!(layer.w.iter().all(|&w| w == 0.0) && layer.t == 0);
    }

    #[test]
    fn softmax_regression_learns_a_separable_problem() {
        // Feature 0 means class 0, feature 1 means class 1.
        let x = SparseBatch {
            offsets: (0..=200).map(|i| i as u32).collect(),
            indices: (0..200).map(|i| (i % 2) as u32).collect(),
            values: vec![1.0; 200],
        };
        let labels: Vec<usize> = (0..200).map(|i| i % 2).collect();
        let mut layer = SparseLinear::new(2, 2, None);
        let rows: Vec<usize> = (0..200).collect();
        let mut logits = Vec::new();
        let mut last = f32::MAX;
        for _ in 0..50 {
            layer.forward_train(&x, &rows, &mut logits);
            last = softmax_xent_grad(&mut logits, 2, &labels, &[1.0; 200]);
            layer
                .step(&logits, 0.1, 0.0, None)
                .expect("a step after its forward pass");
        }
        assert!(last < 0.05, "loss {last}");
    }

    #[test]
    fn every_stack_shares_the_one_compute_device() -> Result<(), KernelError> {
        let a = DenseStack::new(&[4, 2], &mut Rng::new(1))?;
        let b = DenseStack::new(&[4, 2], &mut Rng::new(2))?;
        assert!(a.device().same_device(b.device()));
        assert!(a.device().same_device(&compute_device()));
        if !cfg!(feature = "cuda") {
            assert!(a.device().is_cpu());
        }
        // On a GPU machine, `CLOISTER_REQUIRE_GPU=1` turns a silent CPU
        // fallback of a CUDA build into a failure.
        if std::env::var_os("CLOISTER_REQUIRE_GPU").is_some() {
            assert!(
                a.device().is_cuda(),
                "CLOISTER_REQUIRE_GPU is set but the device is the CPU"
            );
        }
        Ok(())
    }

    #[test]
    fn the_dense_stack_step_reduces_the_loss() -> Result<(), KernelError> {
        let mut rng = Rng::new(1);
        let mut stack = DenseStack::new(&[4, 8, 2], &mut rng)?;
        let h: Vec<f32> = (0..32)
            .map(|i| {
                if (i / 4) % 2 == 0 {
                    (i % 4) as f32
                } else {
                    -((i % 4) as f32)
                }
            })
            .collect();
        let labels: Vec<usize> = (0..8).map(|i| i % 2).collect();
        let (first, dh) = stack.step(&h, 8, &labels, &[1.0; 8], 0.05, 0.0)?;
        assert_eq!(dh.len(), 32);
        let mut loss = first;
        for _ in 0..100 {
            loss = stack.step(&h, 8, &labels, &[1.0; 8], 0.05, 0.0)?.0;
        }
        assert!(loss < first / 4.0, "{first} -> {loss}");
        Ok(())
    }
}
