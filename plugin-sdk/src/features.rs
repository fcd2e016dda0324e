//! Building sparse feature batches.

use crate::SparseBatch;

/// Collects the feature rows of a batch. Push `(index, value)` pairs for the
/// current row in any order; [`Features::end_row`] sorts them, sums repeated
/// indices and appends the row. Zeros are kept, so a dense row pushes every
/// index.
#[derive(Debug, Default)]
pub struct Features {
    batch: SparseBatch,
    row: Vec<(u32, f32)>,
}

impl Features {
    /// An empty builder sized for `rows` rows of about `nnz_per_row` entries.
    pub fn with_capacity(rows: usize, nnz_per_row: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Features {
            batch: SparseBatch {
                offsets,
                indices: Vec::with_capacity(rows * nnz_per_row),
                values: Vec::with_capacity(rows * nnz_per_row),
            },
            row: Vec::new(),
        }
    }

    /// Add `value` at `index` to the current row.
    #[inline]
    pub fn push(&mut self, index: u32, value: f32) {
        self.row.push((index, value));
    }

    /// The entries pushed to the current row so far, unsorted.
    pub fn current_row_mut(&mut self) -> &mut [(u32, f32)] {
        &mut self.row
    }

    /// Close the current row.
    pub fn end_row(&mut self) {
        if self.batch.offsets.is_empty() {
            self.batch.offsets.push(0);
        }
        self.row.sort_unstable_by_key(|&(i, _)| i);
        let mut last: Option<u32> = None;
        for &(i, v) in &self.row {
            if last == Some(i) {
                if let Some(prev) = self.batch.values.last_mut() {
                    *prev += v;
                }
            } else {
                self.batch.indices.push(i);
                self.batch.values.push(v);
                last = Some(i);
            }
        }
        self.row.clear();
        self.batch.offsets.push(self.batch.indices.len() as u32);
    }

    /// Number of closed rows.
    pub fn rows(&self) -> usize {
        self.batch.offsets.len().saturating_sub(1)
    }

    /// The indices and values of the most recently closed row, for in-place
    /// rescaling (e.g. L2 normalisation).
    pub fn last_row_mut(&mut self) -> (&[u32], &mut [f32]) {
        let n = self.batch.offsets.len();
        if n < 2 {
            return (&[], &mut []);
        }
        let (a, b) = (
            self.batch.offsets[n - 2] as usize,
            self.batch.offsets[n - 1] as usize,
        );
        (&self.batch.indices[a..b], &mut self.batch.values[a..b])
    }

    /// The finished batch.
    pub fn into_batch(mut self) -> SparseBatch {
        if self.batch.offsets.is_empty() {
            self.batch.offsets.push(0);
        }
        self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_sorted_and_merged() {
        let mut f = Features::with_capacity(2, 4);
        f.push(5, 1.0);
        f.push(2, 2.0);
        f.push(5, 0.5);
        f.push(7, 1.0);
        f.push(7, -1.0);
        f.end_row();
        f.end_row();
        let b = f.into_batch();
        assert_eq!(b.offsets, vec![0, 3, 3]);
        assert_eq!(b.indices, vec![2, 5, 7]);
        assert_eq!(b.values, vec![2.0, 1.5, 0.0]);
    }
}
