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
use super::graph_step::FixedForward;
use super::model::{DraftModel, Visibility};
use super::slots::{row_positions, BlockMask};
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
        let n_img = self.counts.len();
        let ids: Vec<u32> = (0..rows)
            .flat_map(|r| self.ids[r % n_img].iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (rows, width), &dev)?;
        let pos = row_positions(&self.pos, rows, &dev)?;
        crate::decode::profile::mark_here("feed: inputs (features, ids, positions)")?;
        let vis = match &self.prefix {
            None => Visibility::Causal,
            Some(prefix) => Visibility::Custom(
                BlockMask::new(prefix, width, |_, i, j| j <= i).into_tensor(rows, &dev)?,
            ),
        };
        let out = drafter.forward(&ids, &self.feats, &pos, &vis, cache)?;
        let d = out.dim(2)?;
        let at: Vec<u32> = (0..rows)
            .map(|r| (r * width + self.last(r)) as u32)
            .collect();
        let at = Tensor::from_vec(at, rows, &dev)?;
        let root = out
            .reshape((rows * width, d))?
            .index_select(&at, 0)?
            .reshape((rows, 1, d))?;
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
        for r in 0..rows {
            let ids = &f.ids[r % n_img];
            v.extend(
                ids.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, w - ids.len())),
            );
        }
        for r in 0..rows {
            let pos = &f.pos[r % n_img];
            let last = pos.last().copied().unwrap_or(0);
            v.extend(
                pos.iter()
                    .copied()
                    .chain(std::iter::repeat_n(last, w - pos.len())),
            );
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
        kv.set_staging(Some(self.at));
        kv.set_filled_on_device(Some((filled.clone(), self.at)));
        let out = model.fixed_step(&self.ids, Some(&self.feats), &self.pos, &mask, kv);
        kv.set_filled_on_device(None);
        kv.set_staging(None);
        let out = out?;
        let (rows, _, d) = out.dims3()?;
        let both = Tensor::cat(&[&feats.narrow(1, 0, 1)?, &out], 1)?
            .reshape((rows * (1 + self.width), d))?;
        let root = both.index_select(&self.root_at, 0)?.reshape((rows, 1, d))?;
        feats.slice_set(&root, 1, 0)?;
        Ok(())
    }

    /// After the computation's run: moves the fed pairs (`width` slots) to the filled length.
    pub fn commit(&self, kv: &mut KvCache, width: usize) -> Result<()> {
        if width > 0 {
            kv.commit_staging(self.at, width)?;
        }
        Ok(())
    }
}

/// The block's mask rows over the cache for image prefix `p` (the committed slots, then the
/// fed pairs) with `len` slots committed before the pairs: (the drafting levels' row: the
/// committed slots, the pairs at the block, `-inf` up to `scratch` and 0 over it; the block's
/// own row: the committed slots, 0 over the block, `-inf` elsewhere).
pub(super) fn mask_rows(
    p: &[f32],
    len: usize,
    block_at: usize,
    width: usize,
    scratch: usize,
    drafting: &mut [f32],
    own: &mut [f32],
) {
    let n = p.len().min(len);
    drafting.fill(f32::NEG_INFINITY);
    own.fill(f32::NEG_INFINITY);
    drafting[..n].copy_from_slice(&p[..n]);
    own[..n].copy_from_slice(&p[..n]);
    let fed = &p[n..p.len().min(n + width)];
    drafting[block_at..block_at + fed.len()].copy_from_slice(fed);
    drafting[scratch..].fill(0.0);
    own[block_at..block_at + width].fill(0.0);
}
