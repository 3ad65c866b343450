//! Physical cache slots of a batch whose images advance at their own pace.
//!
//! The target and drafter caches keep one physical length for every batch row. Each image owns
//! a validity flag per slot (both CFG rows of an image share it); its logical sequence is its
//! valid slots in order. Invalid slots ("holes") appear when an image commits fewer tokens than
//! the block the batch appended; attention masks hide them and [`Slots::compact`] removes them.
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Holes below this count are never worth a compaction.
const MIN_HOLES: usize = 8;

/// Compaction threshold for the largest logical length `valid` (a quarter of it, at least
/// [`MIN_HOLES`]): fewer removable holes than this are kept.
pub(crate) fn hole_threshold(valid: usize) -> usize {
    MIN_HOLES.max(valid / 4)
}

/// Per-image validity of the shared physical slots.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slots {
    valid: Vec<Vec<bool>>,
    /// Fixed compaction threshold instead of [`hole_threshold`] (tests).
    fixed: Option<usize>,
}

impl Slots {
    /// `n_img` images sharing `len` valid slots (the condition positions).
    pub fn new(n_img: usize, len: usize) -> Self {
        Self {
            valid: vec![vec![true; len]; n_img],
            fixed: None,
        }
    }

    /// Compacts at `holes` removable holes instead of [`hole_threshold`].
    pub fn with_threshold(mut self, holes: Option<usize>) -> Self {
        self.fixed = holes.map(|h| h.max(1));
        self
    }

    /// Removable holes that trigger a compaction at largest logical length `valid`.
    pub fn threshold(&self, valid: usize) -> usize {
        self.fixed.unwrap_or_else(|| hole_threshold(valid))
    }

    /// Physical length.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, |v| v.len())
    }

    /// Valid slots (logical length) of image `g`.
    pub fn count(&self, g: usize) -> usize {
        self.valid[g].iter().filter(|&&v| v).count()
    }

    /// Whether any image has a hole.
    pub fn has_holes(&self) -> bool {
        self.valid.iter().flatten().any(|&v| !v)
    }

    /// Appends a block of `width` slots of which image g keeps the first `keep[g]`.
    pub fn push_block(&mut self, keep: &[usize], width: usize) {
        for (v, &k) in self.valid.iter_mut().zip(keep) {
            v.extend((0..width).map(|i| i < k));
        }
    }

    /// Additive mask row of image g over the slots (0 valid, `-inf` hole).
    pub fn mask_row(&self, g: usize) -> Vec<f32> {
        self.valid[g]
            .iter()
            .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
            .collect()
    }

    /// Holes that [`Slots::compact`] would remove: physical length minus the largest logical
    /// length.
    pub fn removable(&self) -> usize {
        let most = (0..self.valid.len())
            .map(|g| self.count(g))
            .max()
            .unwrap_or(0);
        self.len() - most
    }

    /// Whether the removable holes reached [`hole_threshold`].
    pub fn should_compact(&self) -> bool {
        let r = self.removable();
        r > 0 && r >= self.threshold(self.len() - r)
    }

    /// Moves every image's valid slots to the front: returns, per image, the slots to keep in
    /// order (padded with slot 0, marked invalid, to the largest logical length) for
    /// [`super::model::DecodeCache::keep`] at start 0, and applies the move to `self`.
    pub fn compact(&mut self) -> Vec<Vec<usize>> {
        let lists: Vec<Vec<usize>> = self
            .valid
            .iter()
            .map(|v| (0..v.len()).filter(|&i| v[i]).collect())
            .collect();
        let width = lists.iter().map(|l| l.len()).max().unwrap_or(0);
        for (v, l) in self.valid.iter_mut().zip(&lists) {
            *v = (0..width).map(|i| i < l.len()).collect();
        }
        lists
            .into_iter()
            .map(|mut l| {
                l.resize(width, 0);
                l
            })
            .collect()
    }
}

/// A host-side additive mask `[n_img, s, past + s]` for a block of `s` new positions, sent to
/// the device once as `[rows, s, past + s]` (rows `r` and `r + n_img` identical).
pub(crate) struct BlockMask {
    data: Vec<f32>,
    n_img: usize,
    s: usize,
    width: usize,
}

impl BlockMask {
    /// For image g and query i: `prefix[g]` (length `past`, the same for every image), then new
    /// position j visible when `new(g, i, j)`.
    pub fn new(prefix: &[Vec<f32>], s: usize, new: impl Fn(usize, usize, usize) -> bool) -> Self {
        let n_img = prefix.len();
        let width = prefix.first().map_or(0, |p| p.len()) + s;
        let mut data = Vec::with_capacity(n_img * s * width);
        for (g, pre) in prefix.iter().enumerate() {
            for i in 0..s {
                data.extend_from_slice(pre);
                data.extend((0..s).map(|j| if new(g, i, j) { 0.0 } else { f32::NEG_INFINITY }));
            }
        }
        Self {
            data,
            n_img,
            s,
            width,
        }
    }

    /// Makes key column `col` (of `past + s`) visible to query i of image g.
    pub fn show(&mut self, g: usize, i: usize, col: usize) {
        self.data[(g * self.s + i) * self.width + col] = 0.0;
    }

    /// The `[rows, s, past + s]` tensor.
    pub fn into_tensor(self, rows: usize, dev: &Device) -> Result<Tensor> {
        let m = Tensor::from_vec(self.data, (self.n_img, self.s, self.width), dev)?;
        Ok(m.repeat((rows / self.n_img.max(1), 1, 1))?)
    }
}

/// Gathers, for every batch row r, the entries `idx[r % n_img]` along dim 1 (one device
/// gather; every list has the same length).
pub(crate) fn gather_rows(x: &Tensor, idx: &[Vec<usize>], n_img: usize) -> Result<Tensor> {
    let (rows, _, d) = x.dims3()?;
    let m = idx.first().map_or(0, |v| v.len());
    if idx.len() != n_img || idx.iter().any(|v| v.len() != m) {
        return Err(Error::invalid(
            "gather",
            "one index list of equal length per image expected (internal error)",
        ));
    }
    // rows of the flattened [rows * s, d]: one upload and one index_select
    let s = x.dim(1)?;
    let flat: Vec<u32> = (0..rows)
        .flat_map(|r| idx[r % n_img].iter().map(move |&i| (r * s + i) as u32))
        .collect();
    let ix = Tensor::from_vec(flat, rows * m, x.device())?;
    Ok(x.reshape((rows * s, d))?
        .index_select(&ix, 0)?
        .reshape((rows, m, d))?)
}

/// Per-row `[rows, s]` u32 values (positions, tokens) from per-image ones (row r: image
/// `r % n_img`'s), one upload.
pub(crate) fn row_values(pos: &[Vec<u32>], rows: usize, dev: &Device) -> Result<Tensor> {
    let n_img = pos.len();
    let s = pos.first().map_or(0, |p| p.len());
    // repeated on the host: one upload, no repeat kernel
    let flat: Vec<u32> = (0..rows / n_img.max(1))
        .flat_map(|_| pos.iter().flatten().copied())
        .collect();
    Ok(Tensor::from_vec(
        flat,
        (rows / n_img.max(1) * n_img, s),
        dev,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_holes_and_compaction() {
        let mut s = Slots::new(3, 2);
        assert!(!s.has_holes());
        s.push_block(&[3, 1, 0], 3);
        assert_eq!(s.len(), 5);
        assert_eq!((s.count(0), s.count(1), s.count(2)), (5, 3, 2));
        assert!(s.has_holes());
        assert_eq!(
            s.mask_row(1)[2..],
            [0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
        // nothing removable: image 0 has no hole
        assert_eq!(s.removable(), 0);
        assert!(!s.should_compact());
        s.push_block(&[1, 4, 0], 4);
        // physical 9, largest logical 7 (image 1)
        assert_eq!(s.removable(), 2);
        let before = s.clone();
        let lists = s.compact();
        assert_eq!(lists[0], vec![0, 1, 2, 3, 4, 5, 0]);
        assert_eq!(lists[1], vec![0, 1, 2, 5, 6, 7, 8]);
        assert_eq!(lists[2], vec![0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(s.len(), 7);
        for (g, list) in lists.iter().enumerate() {
            assert_eq!(s.count(g), before.count(g));
            assert!(list.iter().take(s.count(g)).all(|&i| before.valid[g][i]));
        }
        assert_eq!(s.removable(), 0);
    }

    #[test]
    fn compaction_threshold() {
        let mut s = Slots::new(2, 40);
        s.push_block(&[9, 0], 9);
        // 9 removable holes, logical 49: threshold 12
        assert_eq!(s.removable(), 0);
        s.push_block(&[0, 9], 9);
        assert_eq!(s.removable(), 9);
        assert_eq!(hole_threshold(49), 12);
        assert!(!s.should_compact());
        s.push_block(&[0, 0], 4);
        assert_eq!(s.removable(), 13);
        assert!(s.should_compact());
        let s = s.with_threshold(Some(14));
        assert!(!s.should_compact());
    }

    #[test]
    fn masks_and_positions() -> Result<()> {
        let dev = Device::Cpu;
        let prefix = vec![vec![0.0, f32::NEG_INFINITY], vec![0.0, 0.0]];
        let mut m = BlockMask::new(&prefix, 2, |g, i, j| j <= i && g == 0);
        m.show(1, 1, 1);
        let m = m.into_tensor(4, &dev)?;
        assert_eq!(m.dims(), [4, 2, 4]);
        let v: Vec<Vec<Vec<f32>>> = m.to_vec3()?;
        let ninf = f32::NEG_INFINITY;
        assert_eq!(v[0][1], vec![0.0, ninf, 0.0, 0.0]);
        assert_eq!(v[1][0], vec![0.0, 0.0, ninf, ninf]);
        assert_eq!(v[1][1], vec![0.0, 0.0, ninf, ninf]);
        assert_eq!(v[0][0], vec![0.0, ninf, 0.0, ninf]);
        assert_eq!(v[2], v[0]);
        assert_eq!(v[3], v[1]);
        let p = row_values(&[vec![3, 4], vec![7, 7]], 4, &dev)?;
        let p: Vec<Vec<u32>> = p.to_vec2()?;
        assert_eq!(p, vec![vec![3, 4], vec![7, 7], vec![3, 4], vec![7, 7]]);
        Ok(())
    }
}
