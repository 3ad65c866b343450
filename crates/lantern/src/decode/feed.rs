//! The drafter feed: after acceptance the drafter is fed every image's committed (target
//! feature, next token) pairs, which puts their K/V in its cache and gives the next tree's
//! root features (its output after each image's last pair).
//!
//! A feed is kept as a [`Feed`] until the next step needs it, then either run on its own (one
//! drafter forward appending at the filled length, [`Feed::run`]) or folded into the next
//! step's drafting computation ([`FeedBlock`]): the pairs go through the drafter at a fixed block
//! of slots in front of the scratch block, the roots are gathered from its output on the
//! device, the drafting levels see the block through the prefix mask, and after the replay the
//! block is moved to the filled length (one copy). Folding takes the feed's own inputs, mask,
//! replay and root gather (a dozen host operations with the GPU idle) out of the step. Both
//! run the same computation on the same inputs; only cache slots differ, which attention does
//! not see (keys carry their RoPE rotation).
use super::graph_step::{staged_step, FixedForward};
use super::model::{DraftModel, Visibility};
use super::slots::{gather_rows, row_values, BlockMask};
use crate::cache::KvCache;
use crate::{Error, Result};
use candle_core::Tensor;

/// One step's committed pairs, not yet fed to the drafter.
pub struct Feed {
    /// Target features of the pairs `[rows, width, d]` (row r: image `r % n_img`'s).
    pub feats: Tensor,
    /// Every image's tokens, padded with 0 to `width`.
    pub ids: Vec<Vec<u32>>,
    /// Every image's positions, padded with its last one.
    pub pos: Vec<Vec<u32>>,
    /// Every image's committed pairs (0 for a finished image).
    pub counts: Vec<usize>,
    /// Every image's mask over the slots committed before the pairs when some of them are
    /// holes; `None`: all visible.
    pub prefix: Option<Vec<Vec<f32>>>,
}

impl Feed {
    /// The block's width: the most pairs of any image (the others' padding slots are holes).
    pub fn width(&self) -> usize {
        self.ids.first().map_or(0, |v| v.len())
    }

    /// Batch rows of the feed.
    fn rows(&self) -> Result<usize> {
        Ok(self.feats.dim(0)?)
    }

    /// Every row's root: the index of its image's last pair in the block (0 for a finished
    /// image, whose drafts are never read).
    fn last(&self, r: usize) -> usize {
        self.counts[r % self.counts.len()].saturating_sub(1)
    }

    /// Feeds the pairs on their own (one drafter forward, K/V appended at the filled length);
    /// returns the roots' drafter outputs `[rows, 1, d]`.
    pub fn run<D: DraftModel>(self, drafter: &D, cache: &mut D::Cache) -> Result<Tensor> {
        let (rows, width) = (self.rows()?, self.width());
        let dev = self.feats.device().clone();
        let ids = row_values(&self.ids, rows, &dev)?;
        let pos = row_values(&self.pos, rows, &dev)?;
        crate::decode::profile::mark_here("feed: inputs (features, ids, positions)")?;
        let vis = match &self.prefix {
            None => Visibility::Causal,
            Some(prefix) => Visibility::Custom(
                BlockMask::new(prefix, width, |_, i, j| j <= i).into_tensor(rows, &dev)?,
            ),
        };
        let out = drafter.forward(&ids, &self.feats, &pos, &vis, cache)?;
        let last: Vec<Vec<usize>> = (0..self.counts.len()).map(|g| vec![self.last(g)]).collect();
        let root = gather_rows(&out, &last, self.counts.len())?;
        crate::decode::profile::mark_here("feed: drafter forward over the committed tokens")?;
        Ok(root)
    }
}

/// A feed folded into a drafting computation: its buffers (views of the computation's input
/// buffers, so that the step's uploads write them) and its fixed causal mask.
pub(super) struct FeedBlock {
    /// First slot of the block (the `width` slots in front of the scratch block).
    pub at: usize,
    /// Pairs per row the block holds (the most a step commits).
    pub width: usize,
    /// `[rows, width, d]`: the pairs' target features.
    feats: Tensor,
    /// `[rows, width]` u32 tokens.
    ids: Tensor,
    /// `[rows, width]` u32 positions.
    pos: Tensor,
    /// `[rows]` u32: every row's root in `[rows * (1 + width), d]` (the root slot of the
    /// drafting features, then the block's outputs): one of its pairs, or the root written
    /// by the host when the step has no feed.
    root_at: Tensor,
    /// `[rows, 1, 1, max_len]` f32: the slots committed before the block, the block open.
    prefix: Tensor,
    /// `[1, 1, width, max_len]` f32: causal over the block, 0 elsewhere.
    causal: Tensor,
}

impl FeedBlock {
    /// u32 inputs per row: tokens, positions, root.
    pub fn u32_len(rows: usize, width: usize) -> usize {
        rows * (2 * width + 1)
    }

    /// The block of `width` slots ending at `end` over a cache of `max_len` slots, its u32
    /// inputs in `inputs` (`[u32_len]`, see [`FeedBlock::u32_len`]) and its prefix in `prefix`
    /// (`[rows, 1, 1, max_len]`).
    pub fn new(
        model: &dyn FixedForward,
        rows: usize,
        width: usize,
        end: usize,
        inputs: &Tensor,
        prefix: Tensor,
    ) -> Result<Self> {
        let dev = model.fixed_device();
        let (d, dtype) = model.fixed_output();
        let max_len = prefix.dim(3)?;
        let at = end - width;
        let mut causal = vec![0f32; width * max_len];
        for (i, row) in causal.chunks_exact_mut(max_len).enumerate() {
            row[at + i + 1..end]
                .iter_mut()
                .for_each(|x| *x = f32::NEG_INFINITY);
        }
        let n = rows * width;
        Ok(Self {
            at,
            width,
            feats: Tensor::zeros((rows, width, d), dtype, dev)?,
            ids: inputs.narrow(0, 0, n)?.reshape((rows, width))?,
            pos: inputs.narrow(0, n, n)?.reshape((rows, width))?,
            root_at: inputs.narrow(0, 2 * n, rows)?,
            prefix,
            causal: Tensor::from_vec(causal, (1, 1, width, max_len), dev)?,
        })
    }

    /// The block's u32 inputs for `feed` (`None`: a step without one, every root the host's).
    pub fn u32_inputs(&self, feed: Option<&Feed>, rows: usize) -> Result<Vec<u32>> {
        let w = self.width;
        let mut v = Vec::with_capacity(Self::u32_len(rows, w));
        let Some(f) = feed else {
            v.resize(2 * rows * w, 0);
            v.extend((0..rows).map(|r| (r * (1 + w)) as u32));
            return Ok(v);
        };
        let n_img = f.counts.len();
        if f.width() > w || f.rows()? != rows {
            return Err(Error::invalid(
                "drafter feed",
                format!(
                    "{} pairs over {} rows do not fit the block's {w} over {rows} (internal error)",
                    f.width(),
                    f.rows()?
                ),
            ));
        }
        // every row's list padded to the block: tokens with 0, positions with their last
        for (lists, pad_last) in [(&f.ids, false), (&f.pos, true)] {
            for r in 0..rows {
                let l = &lists[r % n_img];
                let pad = if pad_last {
                    l.last().copied().unwrap_or(0)
                } else {
                    0
                };
                v.extend(
                    l.iter()
                        .copied()
                        .chain(std::iter::repeat_n(pad, w - l.len())),
                );
            }
        }
        v.extend((0..rows).map(|r| (r * (1 + w) + 1 + f.last(r)) as u32));
        Ok(v)
    }

    /// Writes `feed`'s features into the block (no synchronisation).
    pub fn write_feats(&self, feed: Option<&Feed>) -> Result<()> {
        if let Some(f) = feed {
            self.feats
                .slice_set(&f.feats.to_dtype(self.feats.dtype())?.contiguous()?, 1, 0)?;
        }
        Ok(())
    }

    /// Runs the drafter over the block (K/V into its slots; the attention skips the empty
    /// slots from the filled length `filled` to the block) and writes every row's root into
    /// `feats[:, 0]` (`[rows, 1 + fed, d]`, the drafting computation's features).
    pub fn run(
        &self,
        model: &dyn FixedForward,
        kv: &mut KvCache,
        filled: &Tensor,
        feats: &Tensor,
    ) -> Result<()> {
        let mask = self.prefix.broadcast_add(&self.causal)?.contiguous()?;
        let (ids, pos) = (&self.ids, &self.pos);
        let skip = (filled, self.at);
        let out = staged_step(model, kv, self.at, skip, ids, Some(&self.feats), pos, &mask)?;
        let (rows, _, d) = out.dims3()?;
        let both = Tensor::cat(&[&feats.narrow(1, 0, 1)?, &out], 1)?
            .reshape((rows * (1 + self.width), d))?;
        let root = both.index_select(&self.root_at, 0)?.reshape((rows, 1, d))?;
        feats.slice_set(&root, 1, 0)?;
        Ok(())
    }

    /// The block's own mask row for image prefix `p` with `len` slots committed before the
    /// pairs (`out` starts all `-inf`): the committed slots, 0 over the block (the causal mask
    /// is added in the computation).
    pub fn own_mask_row(&self, p: &[f32], len: usize, out: &mut [f32]) {
        let n = p.len().min(len);
        out[..n].copy_from_slice(&p[..n]);
        out[self.at..self.at + self.width].fill(0.0);
    }

    /// After the computation's run: moves the fed pairs (`width` slots) to the filled length.
    pub fn commit(&self, kv: &mut KvCache, width: usize) -> Result<()> {
        if width > 0 {
            kv.commit_staging(self.at, width)?;
        }
        Ok(())
    }
}
