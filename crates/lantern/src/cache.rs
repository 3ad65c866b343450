//! Preallocated key/value caches written in place, with the two rollback operations that
//! speculative decoding needs: `truncate` after a rejection and `keep` to compact the accepted
//! path of a verified draft tree.
use candle_core::{DType, Device, IndexOp, Tensor};

use crate::{Error, Result};

/// K and V buffers of all layers in one tensor `[2, n_layer, b, n_kv_head, max_len, head_dim]`
/// (K at index 0, V at 1; one tensor, so that compaction is a handful of kernels for the whole
/// model, not a few per layer, and fused kernels write both in one launch), plus the filled
/// length shared by all layers.
#[derive(Clone, Debug)]
pub struct KvCache {
    kv: Tensor,
    len: usize,
    max_len: usize,
    /// Fixed-shape mode: new entries are written at this fixed slot (the staging block, see
    /// [`KvCache::set_staging`]).
    staging: Option<usize>,
    /// Fixed-shape mode: a device copy of the filled length (u32 `[1]`) that the step writes
    /// before each replay, and the first slot after the empty ones, if the step keeps one
    /// ([`KvCache::set_filled_on_device`]).
    filled_on_device: Option<(Tensor, usize)>,
    /// Whether [`KvCache::commit_staging`] leaves its block where it is (see
    /// [`KvCache::defer_commit`]).
    defer: bool,
    /// A committed block still at its staging slot: `(slot, entries)`, counted in `len` (its
    /// entries belong at `len - entries..len`).
    pending: Option<(usize, usize)>,
}

impl KvCache {
    /// Allocates zeroed buffers for `n_layer` layers.
    pub fn new(
        n_layer: usize,
        b: usize,
        n_kv_head: usize,
        max_len: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (2, n_layer, b, n_kv_head, max_len, head_dim);
        let kv = Tensor::zeros(shape, dtype, device)?;
        Ok(Self {
            kv,
            len: 0,
            max_len,
            staging: None,
            filled_on_device: None,
            defer: false,
            pending: None,
        })
    }

    /// A cache with no layers and no capacity (a placeholder for moved-out caches).
    pub fn empty() -> Self {
        let kv = Tensor::zeros((2, 0, 0, 0, 0, 0), DType::F32, &Device::Cpu)
            .expect("a zero-sized CPU tensor always allocates");
        Self {
            kv,
            len: 0,
            max_len: 0,
            staging: None,
            filled_on_device: None,
            defer: false,
            pending: None,
        }
    }

    /// Switches to the fixed-shape mode that CUDA graphs need (or back, with `None`): new
    /// entries are written at slot `at` (a fixed staging block, so that the write has the same
    /// arguments at every length) and [`KvCache::append`] returns the whole buffers (`max_len`
    /// keys), so attention needs an explicit mask over all of them. After the step,
    /// [`KvCache::commit_staging`] moves the block to the filled length. Attention does not
    /// depend on slot order (keys carry their RoPE rotation), only on the mask.
    pub fn set_staging(&mut self, at: Option<usize>) {
        self.staging = at;
    }

    /// The staging slot of the fixed-shape mode, if on.
    pub fn staging(&self) -> Option<usize> {
        self.staging
    }

    /// In the fixed-shape mode, a u32 `[1]` on the device that holds the filled length when
    /// the step's kernels run (the step writes it before each launch or graph replay), and the
    /// first slot in use after it (the staging block, or a scratch block before it): attention
    /// then skips the empty slots between the two instead of masking them (the step's mask
    /// must hide them). `None` (the default): every slot is visited.
    pub fn set_filled_on_device(&mut self, filled: Option<(Tensor, usize)>) {
        self.filled_on_device = filled;
    }

    /// What [`KvCache::set_filled_on_device`] set, while in the fixed-shape mode.
    pub fn filled_on_device(&self) -> Option<(&Tensor, usize)> {
        self.staging
            .and(self.filled_on_device.as_ref())
            .map(|(t, at)| (t, *at))
    }

    /// Copies the `s` staged entries at slot `from` to the filled length and advances it (one
    /// copy for the whole model, [`crate::fused::move_slots`]).
    ///
    /// With [`KvCache::defer_commit`] on, the block stays at its staging slot and only the
    /// length advances: a [`KvCache::keep`] or [`KvCache::keep_rows`] of that block then gathers
    /// its kept entries from there (a verified tree's few accepted entries instead of the whole
    /// block twice); anything else moves it first.
    pub fn commit_staging(&mut self, from: usize, s: usize) -> Result<()> {
        self.settle()?;
        if self.len + s > from || from + s > self.max_len {
            return Err(Error::invalid(
                "KV cache",
                format!(
                    "staging block {from}..{} overlaps the filled length {} + {s} (internal error)",
                    from + s,
                    self.len
                ),
            ));
        }
        if self.defer {
            self.pending = Some((from, s));
        } else {
            crate::fused::move_slots(&self.kv, from, self.len, s)?;
        }
        self.len += s;
        Ok(())
    }

    /// Whether the next staged blocks stay at their staging slot until a keep of them (see
    /// [`KvCache::commit_staging`]): the speculative loop turns it on around verification,
    /// whose block is always compacted next.
    pub fn defer_commit(&mut self, on: bool) {
        self.defer = on;
    }

    /// Moves a deferred block ([`KvCache::commit_staging`]) to its filled slots, if any.
    pub fn settle(&mut self) -> Result<()> {
        if let Some((at, s)) = self.pending.take() {
            crate::fused::move_slots(&self.kv, at, self.len - s, s)?;
        }
        Ok(())
    }

    /// The staging slot of the deferred block when it is the one from `start` to the filled
    /// length (a keep then gathers from there); else settles any deferred block and returns
    /// `None` (the keep compacts in place).
    fn deferred_from(&mut self, start: usize) -> Result<Option<usize>> {
        match self.pending {
            Some((at, s)) if start + s == self.len => Ok(Some(at)),
            _ => {
                self.settle()?;
                Ok(None)
            }
        }
    }

    /// Keeps the entries `rows[r]` of the deferred block at staging slot `at` (see
    /// [`KvCache::deferred_from`]) at `start..`: one gather of the kept entries only.
    fn gather_deferred(&mut self, at: usize, start: usize, rows: &[Vec<usize>]) -> Result<()> {
        crate::fused::gather_slots(&self.kv, rows, at, start)?;
        self.pending = None;
        self.len = start + rows.first().map_or(0, |r| r.len());
        Ok(())
    }

    /// Number of filled positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in positions.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of layers.
    pub fn n_layer(&self) -> usize {
        self.kv.dim(1).unwrap_or(0)
    }

    /// Batch size the cache was allocated for.
    pub fn batch(&self) -> usize {
        self.kv.dim(2).unwrap_or(0)
    }

    /// Forgets everything after the first `len` positions (no copy).
    pub fn truncate(&mut self, len: usize) {
        if let Some((at, s)) = self.pending {
            let start = self.len - s;
            // a deferred block keeps only its entries below `len`
            self.pending = (len > start).then_some((at, s.min(len - start)));
        }
        self.len = self.len.min(len);
    }

    /// Rejects a kept row at or past the filled length (rows index the last block only).
    fn check_block_row(&self, start: usize, max_row: usize) -> Result<()> {
        if start + max_row >= self.len {
            return Err(Error::invalid(
                "KV cache keep",
                format!(
                    "row {} past the filled length {} (start {start}); keep rows of the last block only",
                    start + max_row,
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// Compacts a verified block: the entries at `start + rows[i]` move to `start + i`, then the
    /// length becomes `start + rows.len()`. Only the block after `start` is gathered.
    pub fn keep(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        let Some(&max_row) = rows.iter().max() else {
            self.truncate(start);
            return Ok(());
        };
        self.check_block_row(start, max_row)?;
        if let Some(at) = self.deferred_from(start)? {
            return self.gather_deferred(at, start, &vec![rows.to_vec(); self.batch()]);
        }
        let dev = self.kv.device().clone();
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), &dev)?;
        // Copy only the block (index_select needs a contiguous source).
        let block = self
            .kv
            .narrow(4, start, max_row + 1)?
            .contiguous()?
            .index_select(&idx, 4)?;
        self.kv.slice_set(&block, 4, start)?;
        self.len = start + rows.len();
        Ok(())
    }

    /// Per-row [`KvCache::keep`]: for batch row `r`, the entries at `start + rows[r][i]` move to
    /// `start + i`; every list must have the same length. Equal lists use [`KvCache::keep`];
    /// otherwise one gather over the block after `start` serves all rows.
    pub fn keep_rows(&mut self, start: usize, rows: &[Vec<usize>]) -> Result<()> {
        let b = self.batch();
        if rows.len() != b {
            return Err(Error::invalid(
                "KV cache keep",
                format!(
                    "{} row lists for a batch of {b} (give one per batch row)",
                    rows.len()
                ),
            ));
        }
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let m = first.len();
        if rows.iter().any(|r| r.len() != m) {
            return Err(Error::invalid(
                "KV cache keep",
                "row lists of different lengths (every batch row must keep as many entries)",
            ));
        }
        if rows.iter().all(|r| r == first) {
            return self.keep(start, first);
        }
        let max_row = rows.iter().flatten().copied().max().unwrap_or(0);
        self.check_block_row(start, max_row)?;
        if let Some(at) = self.deferred_from(start)? {
            return self.gather_deferred(at, start, rows);
        }
        let dev = self.kv.device().clone();
        let idx: Vec<u32> = rows.iter().flatten().map(|&r| r as u32).collect();
        let &[two, n_layer, _, h, _, d] = self.kv.dims() else {
            unreachable!("the cache tensor has rank 6")
        };
        let ix = Tensor::from_vec(idx, (1, 1, b, 1, m, 1), &dev)?
            .broadcast_as((two, n_layer, b, h, m, d))?
            .contiguous()?;
        let block = self.kv.narrow(4, start, max_row + 1)?.contiguous()?;
        let kept = block.gather(&ix, 4)?;
        self.kv.slice_set(&kept, 4, start)?;
        self.len = start + m;
        Ok(())
    }

    /// Writes `k`, `v` (`[b, n_kv_head, s, head_dim]`) of `layer` at the current length and
    /// returns views of all filled entries including them (`[b, n_kv_head, len + s, head_dim]`);
    /// in the fixed-shape mode ([`KvCache::set_staging`]) at the staging slot, returning the
    /// whole buffers.
    /// The length itself advances only with [`KvCache::advance`], after the last layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let &[b, h, s, _] = k.dims() else {
            return Err(Error::invalid(
                "KV cache",
                format!("new keys {:?} are not [b, heads, s, head_dim]", k.dims()),
            ));
        };
        self.settle()?;
        self.check_write(layer, b, h, s)?;
        let (ck, cv) = (&self.kv.i((0, layer))?, &self.kv.i((1, layer))?);
        if let Some(at) = self.staging {
            ck.slice_set(&k.contiguous()?, 2, at)?;
            cv.slice_set(&v.contiguous()?, 2, at)?;
            return Ok((ck.clone(), cv.clone()));
        }
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        let n = self.len + s;
        Ok((ck.narrow(2, 0, n)?, cv.narrow(2, 0, n)?))
    }

    /// Checks that `s` new positions of `layer` for `b` rows of `heads` K/V heads fit.
    fn check_write(&self, layer: usize, b: usize, heads: usize, s: usize) -> Result<()> {
        if self.pending.is_some() {
            return Err(Error::invalid(
                "KV cache",
                "a write while a deferred block is not in place (internal error)",
            ));
        }
        if self.staging.is_none() && self.len + s > self.max_len {
            return Err(Error::invalid(
                "KV cache",
                format!(
                    "{} + {s} positions exceed its capacity {}; allocate a longer cache",
                    self.len, self.max_len
                ),
            ));
        }
        if layer >= self.n_layer() {
            return Err(Error::invalid("KV cache", format!("no layer {layer}")));
        }
        let dims = self.kv.dims();
        if [b, heads] != dims[2..4] {
            return Err(Error::invalid(
                "KV cache",
                format!(
                    "batch/heads {:?} differ from the cache's {:?}; allocate it for this batch",
                    [b, heads],
                    &dims[2..4]
                ),
            ));
        }
        Ok(())
    }

    /// For kernels that write the cache themselves: checks that `s` new positions of `layer`
    /// fit and returns the whole buffer tensor (`[2, n_layer, b, heads, max_len, head_dim]`),
    /// the slot where the new positions go (the filled length, or the staging slot) and the
    /// number of keys attention then covers (filled length + `s`, or `max_len` when staging).
    pub fn write_slot(
        &self,
        layer: usize,
        b: usize,
        heads: usize,
        s: usize,
    ) -> Result<(&Tensor, usize, usize)> {
        self.check_write(layer, b, heads, s)?;
        Ok(match self.staging {
            Some(at) => (&self.kv, at, self.max_len),
            None => (&self.kv, self.len, self.len + s),
        })
    }

    /// Marks `s` freshly appended positions as filled (not in the fixed-shape mode, where
    /// [`KvCache::commit_staging`] does it).
    pub fn advance(&mut self, s: usize) {
        self.len = (self.len + s).min(self.max_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize) -> Result<KvCache> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 1, 1, 8, 2, DType::F32, &dev)?;
        let vals: Vec<f32> = (0..n * 2).map(|x| x as f32).collect();
        let t = Tensor::from_vec(vals, (1, 1, n, 2), &dev)?;
        for l in 0..2 {
            c.append(l, &t, &(&t + 100.0)?)?;
        }
        c.advance(n);
        Ok(c)
    }

    #[test]
    fn keep_compacts_block() -> Result<()> {
        let mut c = filled(6)?;
        c.keep(2, &[0, 3])?; // positions 2 and 5 -> 2 and 3
        assert_eq!(c.len(), 4);
        let k =
            c.kv.get(0)?
                .get(1)?
                .narrow(2, 0, 4)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        assert_eq!(k, vec![0., 1., 2., 3., 4., 5., 10., 11.]);
        let v =
            c.kv.get(1)?
                .get(0)?
                .narrow(2, 3, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        assert_eq!(v, vec![110., 111.]);
        assert!(c.keep(2, &[5]).is_err());
        c.truncate(1);
        assert_eq!(c.len(), 1);
        Ok(())
    }

    #[test]
    fn keep_with_batch_and_heads() -> Result<()> {
        // Strided (non-contiguous) views: b = 2, 3 heads.
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2, 3, 8, 2, DType::F32, &dev)?;
        let t = Tensor::arange(0f32, 2. * 3. * 5. * 2., &dev)?.reshape((2, 3, 5, 2))?;
        c.append(0, &t, &t)?;
        c.advance(5);
        c.keep(1, &[3, 1])?;
        assert_eq!(c.len(), 3);
        let got = c.kv.get(0)?.get(0)?.narrow(2, 0, 3)?;
        let idx = Tensor::new(&[0u32, 4, 2], &dev)?;
        let want = t.index_select(&idx, 2)?;
        let diff = (got - want)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn keep_rows_gathers_per_row() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2, 2, 8, 1, DType::F32, &dev)?;
        let t = Tensor::arange(0f32, 2. * 2. * 5., &dev)?.reshape((2, 2, 5, 1))?;
        c.append(0, &t, &(&t + 100.0)?)?;
        c.advance(5);
        c.keep_rows(1, &[vec![0, 3], vec![2, 1]])?;
        assert_eq!(c.len(), 3);
        let k =
            c.kv.get(0)?
                .get(0)?
                .narrow(2, 0, 3)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        // row 0 keeps positions 0, 1, 4; row 1 keeps 0, 3, 2 (two heads each)
        let want = [0., 1., 4., 5., 6., 9., 10., 13., 12., 15., 18., 17.];
        assert_eq!(k, want);
        let v = c.kv.get(1)?.get(0)?.i((1, 1, 1, 0))?.to_scalar::<f32>()?;
        assert_eq!(v, 118.);
        assert!(c.keep_rows(0, &[vec![0], vec![0, 1]]).is_err());
        assert!(c.keep_rows(0, &[vec![9], vec![0]]).is_err());
        // equal lists take the shared path
        c.keep_rows(1, &[vec![1], vec![1]])?;
        assert_eq!(c.len(), 2);
        Ok(())
    }

    #[test]
    fn overflow_is_an_error() -> Result<()> {
        let mut c = filled(6)?;
        let t = Tensor::zeros((1, 1, 3, 2), DType::F32, &Device::Cpu)?;
        assert!(c.append(0, &t, &t).is_err());
        Ok(())
    }

    /// A block of 4 committed after 3 filled slots, its staging block at slot 12 (16 slots;
    /// 2 layers, 2 rows, 2 heads, head dim 2), deferred or not.
    fn staged(defer: bool) -> Result<KvCache> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 2, 2, 16, 2, DType::F32, &dev)?;
        let t = Tensor::arange(0f32, 2. * 2. * 3. * 2., &dev)?.reshape((2, 2, 3, 2))?;
        for l in 0..2 {
            c.append(l, &t, &(&t - 50.0)?)?;
        }
        c.advance(3);
        let b = (Tensor::arange(0f32, 2. * 2. * 4. * 2., &dev)?.reshape((2, 2, 4, 2))? + 1000.0)?;
        c.set_staging(Some(12));
        for l in 0..2 {
            let (b, v) = (b.affine(1.0, l as f64)?, (&b + 500.0)?);
            c.append(l, &b, &v)?;
        }
        c.set_staging(None);
        c.defer_commit(defer);
        c.commit_staging(12, 4)?;
        c.defer_commit(false);
        Ok(c)
    }

    /// The slots `0..len` of every plane, layer, row and head.
    fn filled_slots(c: &KvCache) -> Result<Vec<f32>> {
        Ok(c.kv.narrow(4, 0, c.len())?.flatten_all()?.to_vec1()?)
    }

    #[test]
    fn deferred_block_keeps_like_a_committed_one() -> Result<()> {
        // per-row lists, equal lists, and anything else settling first
        for rows in [vec![vec![0, 2], vec![3, 1]], vec![vec![0, 3, 1]; 2]] {
            let (mut a, mut b) = (staged(false)?, staged(true)?);
            assert_eq!((a.len(), b.len()), (7, 7));
            assert!(b.pending.is_some());
            a.keep_rows(3, &rows)?;
            b.keep_rows(3, &rows)?;
            assert!(b.pending.is_none());
            assert_eq!(b.len(), 3 + rows[0].len());
            assert_eq!(filled_slots(&a)?, filled_slots(&b)?);
        }
        // a keep of an earlier block, an append: the deferred block moves first
        let (mut a, mut b) = (staged(false)?, staged(true)?);
        a.keep_rows(1, &[vec![0, 5], vec![1, 4]])?;
        b.keep_rows(1, &[vec![0, 5], vec![1, 4]])?;
        assert_eq!(filled_slots(&a)?, filled_slots(&b)?);
        let (a, mut b) = (staged(false)?, staged(true)?);
        let t = Tensor::zeros((2, 2, 1, 2), DType::F32, &Device::Cpu)?;
        b.append(0, &t, &t)?;
        assert!(b.pending.is_none());
        assert_eq!(filled_slots(&a)?, filled_slots(&b)?);
        // truncating into the block keeps its first entries deferred; below it drops it
        let (mut a, mut b) = (staged(false)?, staged(true)?);
        a.truncate(5);
        b.truncate(5);
        assert_eq!(b.pending, Some((12, 2)));
        b.settle()?;
        assert_eq!(filled_slots(&a)?, filled_slots(&b)?);
        let mut b = staged(true)?;
        b.truncate(3);
        assert_eq!((b.pending, b.len()), (None, 3));
        Ok(())
    }
}
