//! A static tree's whole drafting phase as one fixed-shape computation, replayed as one CUDA
//! graph per step on GPUs.
//!
//! Level-by-level drafting ([`super::draft::draft_static`]) already keeps every pick on the
//! device, but each level still costs the host a dozen launches and uploads (its ids, features,
//! positions and mask, the drafter step, the output head, the probabilities and the picks) for
//! ~0.1 ms of GPU work, so the host, not the GPU, sets the pace. A static shape fixes every
//! level's size and structure, so the whole phase can be recorded once: the root features go
//! through the target's output head, the CFG'd probabilities and the picks; each level's tokens
//! are gathered from the picks and its features from earlier outputs by fixed indices; the
//! drafter runs with its K/V written into a scratch block at the end of its cache (one slot per
//! fed node of the shape, never committed: drafted nodes are dropped after the step) and a mask
//! over the whole cache (the committed slots as the step's prefix says, then in the scratch
//! block each node's ancestors and itself). Per step the host writes four small buffers (root
//! features, prefix mask, positions, and the draws' uniforms), replays, and reads every level's
//! picks in one transfer.
//!
//! The computation equals the level-by-level path's (same ops, same ids, features, positions
//! and visible keys); only masked cache slots differ, which add nothing. Tests compare the two
//! on the CPU, where the same fixed-shape path runs eagerly.
use super::draft::{build_trees, plan, Depth};
use super::feed::{Feed, FeedBlock};
use super::graph_step::{replay_or_capture, staged_step, Captured, FixedForward};
use super::level::{level_uniforms, widest};
use super::static_trees::TreeShape;
use super::tree::{DraftKind, DraftTree, QDist};
use crate::cache::KvCache;
use crate::fused::picks::{self, MAX_PICKS};
use crate::sampling::SamplingParams;
use crate::{Error, Result};
use candle_core::{DType, Tensor, TensorId};
use rand::RngCore;
use std::sync::Arc;

/// Drafting graphs kept per cache (one per tree shape and sampling setting met).
pub const MAX_DRAFTING_GRAPHS: usize = 4;

/// What a drafting computation was built for.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftingKey {
    /// Rank paths of the shape.
    pub paths: Vec<Vec<usize>>,
    /// Images (the cache has `n_img` or `2 n_img` rows).
    pub n_img: usize,
    /// CFG scale, if CFG is on.
    pub cfg: Option<f32>,
    /// Sampling filters of the drafter's rows.
    pub sampling: SamplingParams,
    /// The output head's weight tensor (the computation reads it).
    pub lm_head: TensorId,
    /// Pairs per row of the drafter feed folded into the computation (the most a step
    /// commits); 0: the feed runs on its own.
    pub feed: usize,
}

/// The drafter side of the fixed-shape drafting: the model, its cache and graphs, and its
/// position clamp (positions at or past `rope_rows` read row `zero_row`).
pub struct FixedDrafting<'a> {
    /// The drafter.
    pub model: &'a dyn FixedForward,
    /// Its cache.
    pub kv: &'a mut KvCache,
    /// Its drafting computations (kept with the cache, see [`super::graph_step::GraphSteps`]).
    pub graphs: &'a mut Vec<StaticDrafting>,
    /// Its dynamic-tree drafting computations.
    pub dynamic: &'a mut Vec<super::dynamic_graph::DynamicDrafting>,
    /// Whether to capture CUDA graphs (else the computation runs eagerly: CPU tests).
    pub capture: bool,
    /// RoPE table rows of the drafter.
    pub rope_rows: usize,
    /// Row read by positions past the table.
    pub zero_row: usize,
}

/// One step's inputs of a drafting computation ([`draft_static_fixed`],
/// [`super::dynamic_graph::draft_dynamic_fixed`]).
pub struct DraftStep<'a> {
    /// Root token of every image.
    pub root_tokens: &'a [u32],
    /// Drafter output after every row's root `[rows, 1, d]`.
    pub root_feat: &'a Tensor,
    /// Additive mask of every image over the committed slots (one length: the cache's).
    pub prefix: &'a [Vec<f32>],
    /// Logical position of every image's root.
    pub roots: &'a [usize],
    /// Vocabulary size.
    pub vocab: usize,
    /// The last step's committed pairs, when the computation feeds them to the drafter first
    /// (its key's `feed` > 0; `None`: the roots are `root_feat`).
    pub feed: Option<&'a Feed>,
}

/// A shape's depths and the layout of their pick blocks in the flat picks.
struct Plan {
    depths: Vec<Depth>,
    /// Width of each depth's pick block.
    ks: Vec<usize>,
    /// Probability rows per image of the level each depth is picked from.
    level_rows: Vec<usize>,
    /// Start of each depth's block in the flat picks; their total last.
    block_at: Vec<usize>,
}

/// One shape's drafting computation: its fixed indices, masks and buffers, and its graph.
pub struct StaticDrafting {
    key: DraftingKey,
    /// The shape's depths and pick blocks (shared with every step's [`Drafted`]).
    plan: Arc<Plan>,
    /// The step's inputs and the fed nodes' outputs.
    bufs: StepBuffers,
    /// Every depth's uniforms, flat (sampling only).
    uniforms: Option<Tensor>,
    // fixed, built once
    /// Per expansion: `[1, 1, k, max_len]` f32, `-inf` on scratch slots that are not the
    /// node's ancestors or itself.
    tree_masks: Vec<Tensor>,
    /// Per expansion: indices of the fed tokens in the previous depth's flat pick block.
    token_at: Vec<Tensor>,
    /// Per expansion: indices of the parents' features in `feats` as `[rows * (1 + fed), d]`.
    feat_at: Vec<Tensor>,
    /// Per depth: the requested rows of its level when not all rows in order.
    select_at: Vec<Option<Tensor>>,
    /// `[n_img * (nodes - 1)]`: where every image's drafted node (shape order, root excluded)
    /// has its token in `picks`.
    verify_at: Tensor,
    /// `[1, nodes, nodes]` f32: the shape's tree mask (0 on a node's ancestors and itself).
    tree_mask: Tensor,
    // outputs
    /// Every depth's pick block, flat, one after the other.
    picks: Tensor,
    /// Per depth: its level's probabilities (sampling only; the trees keep rows of them).
    probs: Vec<Tensor>,
    graph: Captured,
}

impl Drafting for StaticDrafting {
    fn graph_mut(&mut self) -> &mut Captured {
        &mut self.graph
    }
    /// The computation (see the module docs); writes `picks` and `probs`, drops every
    /// temporary before it returns (so a captured graph frees what it allocates).
    fn run(
        &self,
        model: &dyn FixedForward,
        lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
        kv: &mut KvCache,
    ) -> Result<()> {
        let (n_img, cfg, sampling) = (self.key.n_img, self.key.cfg, &self.key.sampling);
        let b = &self.bufs;
        let probs_of = |h: &Tensor| -> Result<Tensor> {
            Ok(picks::draft_probs_cfg(&lm_head(h)?, n_img, cfg, sampling)?)
        };
        let mut level = probs_of(&b.roots(model, kv)?)?;
        let plan = &*self.plan;
        let mut at_u = 0;
        for (i, dp) in plan.depths.iter().enumerate() {
            let (k, n_want) = (plan.ks[i], n_img * dp.requests.len());
            let sel = match &self.select_at[i] {
                Some(ix) => level.index_select(ix, 0)?,
                None => level.clone(),
            };
            let block = match &self.uniforms {
                None => picks::top_k(&sel, k)?,
                Some(u) => {
                    let us = u.narrow(0, at_u, n_want * k)?.reshape((n_want, k))?;
                    at_u += n_want * k;
                    picks::draw(&sel, &us)?
                }
            }
            .flatten_all()?;
            self.picks.slice_set(&block, 0, plan.block_at[i])?;
            if let Some(p) = self.probs.get(i) {
                p.slice_set(&level, 0, 0)?;
            }
            if i + 1 == plan.depths.len() {
                break;
            }
            let kf = dp.feed.len();
            let ids = picks::pick_tokens(&block, &self.token_at[i], b.rows / n_img)?
                .reshape((b.rows, kf))?;
            let feats = b.gather_feats(&self.feat_at[i], kf)?;
            let mask = b.prefix.broadcast_add(&self.tree_masks[i])?.contiguous()?;
            let out = b.expand(model, kv, i, &ids, &feats, &mask)?;
            level = probs_of(&out)?;
        }
        Ok(())
    }
}

impl StaticDrafting {
    /// The computation for `key` on a cache of `rows` rows and `max_len` slots; `None` where a
    /// pick block is wider than the picks ops serve or the shape feeds nothing.
    fn new(
        key: DraftingKey,
        shape: &TreeShape,
        model: &dyn FixedForward,
        rows: usize,
        max_len: usize,
        vocab: usize,
    ) -> Result<Option<Self>> {
        let dev = model.fixed_device().clone();
        let n_img = key.n_img;
        let greedy = key.sampling.is_greedy();
        let depths = plan(shape);
        let ks: Vec<usize> = depths
            .iter()
            .map(|dp| widest(&dp.want(n_img), vocab))
            .collect();
        // expansions: every depth but the last feeds its nodes with children
        let n_exp = depths.len().saturating_sub(1);
        if n_exp == 0 || ks.iter().any(|&k| k == 0 || k > MAX_PICKS) {
            return Ok(None);
        }
        let mut offsets = vec![0];
        for dp in &depths[..n_exp] {
            offsets.push(offsets.last().copied().unwrap_or(0) + dp.feed.len());
        }
        let fed = offsets[n_exp];
        if fed == 0 || fed >= max_len {
            return Ok(None);
        }
        let scratch = max_len - fed;
        let mut level_rows = vec![1];
        level_rows.extend(depths[..n_exp].iter().map(|dp| dp.feed.len()));
        // fed index of every shape node fed, and each fed node's ancestors (fed indices)
        let mut fed_of = vec![None; shape.len()];
        let mut anc: Vec<Vec<usize>> = Vec::with_capacity(fed);
        let (mut tree_masks, mut token_at, mut feat_at) = (vec![], vec![], vec![]);
        for (e, dp) in depths[..n_exp].iter().enumerate() {
            let k = dp.feed.len();
            token_at.push(Tensor::from_vec(
                dp.fed_token_at(n_img, ks[e]),
                n_img * k,
                &dev,
            )?);
            let mut src = Vec::with_capacity(k);
            let mut mask = vec![0f32; k * max_len];
            for (j, &(s, _, _)) in dp.feed.iter().enumerate() {
                let p = shape.parents[s];
                let parent = if p == 0 { None } else { fed_of[p] };
                let mut a: Vec<usize> = parent.map_or_else(Vec::new, |p: usize| anc[p].clone());
                a.push(offsets[e] + j);
                let row = &mut mask[j * max_len..(j + 1) * max_len];
                row[scratch..]
                    .iter_mut()
                    .for_each(|x| *x = f32::NEG_INFINITY);
                for &m in &a {
                    row[scratch + m] = 0.0;
                }
                src.push(parent.map_or(0, |p| p + 1));
                anc.push(a);
            }
            for (j, &(s, _, _)) in dp.feed.iter().enumerate() {
                fed_of[s] = Some(offsets[e] + j);
            }
            tree_masks.push(Tensor::from_vec(mask, (1, 1, k, max_len), &dev)?);
            let at: Vec<u32> = (0..rows)
                .flat_map(|r| src.iter().map(move |&s| (r * (1 + fed) + s) as u32))
                .collect();
            feat_at.push(Tensor::from_vec(at, rows * k, &dev)?);
        }
        let mut select_at = Vec::with_capacity(depths.len());
        for (dp, &lr) in depths.iter().zip(&level_rows) {
            let all =
                dp.requests.len() == lr && dp.requests.iter().enumerate().all(|(i, r)| r.1 == i);
            select_at.push(if all {
                None
            } else {
                let ix: Vec<u32> = (0..n_img)
                    .flat_map(|g| dp.requests.iter().map(move |r| (g * lr + r.1) as u32))
                    .collect();
                Some(Tensor::from_vec(ix, n_img * dp.requests.len(), &dev)?)
            });
        }
        // every drafted node's token in the flat picks: depth block, request, rank
        let mut block_at = vec![0];
        for (dp, &k) in depths.iter().zip(&ks) {
            block_at
                .push(block_at.last().copied().unwrap_or(0) + n_img * dp.requests.len() * k * 2);
        }
        let mut verify_at = Vec::with_capacity(n_img * (shape.len() - 1));
        for g in 0..n_img {
            for c in 1..shape.len() {
                let i = shape.depths[c] - 1;
                let (dp, k) = (&depths[i], ks[i]);
                let (r, rank) = dp
                    .requests
                    .iter()
                    .enumerate()
                    .find_map(|(r, (_, _, ch))| ch.iter().position(|&x| x == c).map(|j| (r, j)))
                    .ok_or_else(|| Error::invalid("tree shape", "node without a parent request"))?;
                verify_at.push((block_at[i] + dp.token_index(g, k, r, rank)) as u32);
            }
        }
        let n = shape.len();
        let tree_mask = DraftTree {
            tokens: vec![0; n],
            parents: shape.parents.clone(),
            depths: shape.depths.clone(),
            q: vec![1.0; n],
            q_dists: vec![None; n],
            kind: DraftKind::Deterministic,
        }
        .additive_mask();
        let n_uniforms: usize = depths
            .iter()
            .zip(&ks)
            .map(|(dp, &k)| n_img * dp.requests.len() * k)
            .sum();
        let probs = if greedy {
            Vec::new()
        } else {
            level_rows
                .iter()
                .map(|&lr| Tensor::zeros((n_img * lr, vocab), DType::F32, &dev))
                .collect::<candle_core::Result<_>>()?
        };
        let n_picks = block_at[depths.len()];
        let Some(bufs) = StepBuffers::new(model, rows, max_len, offsets, key.feed)? else {
            return Ok(None);
        };
        Ok(Some(Self {
            plan: Arc::new(Plan {
                depths,
                ks,
                level_rows,
                block_at,
            }),
            bufs,
            uniforms: (!greedy)
                .then(|| Tensor::zeros(n_uniforms, DType::F64, &dev))
                .transpose()?,
            tree_masks,
            token_at,
            feat_at,
            select_at,
            verify_at: Tensor::from_vec(verify_at, n_img * (n - 1), &dev)?,
            tree_mask: Tensor::from_vec(tree_mask, (1, n, n), &dev)?,
            picks: Tensor::zeros(n_picks, DType::F32, &dev)?,
            probs,
            graph: Default::default(),
            key,
        }))
    }

    /// Writes one step's inputs into the buffers (no synchronisation).
    fn set_inputs(
        &self,
        step: &DraftStep,
        kv_len: usize,
        clamp: (usize, usize),
        rngs: &mut [&mut dyn RngCore],
    ) -> Result<()> {
        let n_img = self.key.n_img;
        let dev = self.bufs.feats.device();
        self.bufs.write(n_img, step, kv_len, clamp)?;
        if let Some(u) = &self.uniforms {
            let mut all = Vec::with_capacity(u.elem_count());
            for (dp, &k) in self.plan.depths.iter().zip(&self.plan.ks) {
                all.extend(level_uniforms(&dp.want(n_img), k, rngs));
            }
            u.slice_set(&Tensor::from_vec(all, u.elem_count(), dev)?, 0, 0)?;
        }
        Ok(())
    }
}

/// The per-step buffers of a drafting computation (static or dynamic): written by the host
/// before each run, read and filled by the run.
pub(super) struct StepBuffers {
    /// Start of each expansion's nodes among the fed nodes; the fed count last.
    pub offsets: Vec<usize>,
    /// First slot of the scratch block (the cache's last `fed` slots).
    pub scratch: usize,
    /// Rows of the drafter's batch.
    pub rows: usize,
    /// `[rows, 1 + fed, d]`: the root's drafter output, then every fed node's.
    pub feats: Tensor,
    /// `[rows, 1, 1, max_len]` f32: the committed slots' mask (and a folded feed's pairs at its
    /// block), `-inf` from the filled length to the scratch block, 0 over it; a view of
    /// `masks`.
    pub prefix: Tensor,
    /// `[rows, 1, 1, max_len]` f32 (`[2 rows, ..]` with a folded feed): `prefix`, then the
    /// feed's own prefix rows, so that one upload writes both.
    masks: Tensor,
    /// `[1]` u32: the filled length, from which the attention kernels skip the empty slots up
    /// to the scratch block or the feed's block (the prefix hides them); a view of `pos`.
    filled: Tensor,
    /// u32: every fed node's (clamped) position, level by level (`[rows, kf]` per level), so
    /// that a level reads a contiguous view; then the filled length; then a folded feed's
    /// inputs ([`FeedBlock::u32_len`]): one upload.
    pos: Tensor,
    /// The drafter feed folded into the computation, if it is.
    feed: Option<FeedBlock>,
}

impl StepBuffers {
    /// Buffers for `rows` rows, a cache of `max_len` slots and expansions at `offsets` (the fed
    /// count last; the caller checks that it is below `max_len`), with a folded feed block of
    /// `feed` pairs per row in front of the scratch block (0: none); `None` where the block
    /// does not fit.
    pub fn new(
        model: &dyn FixedForward,
        rows: usize,
        max_len: usize,
        offsets: Vec<usize>,
        feed: usize,
    ) -> Result<Option<Self>> {
        let dev = model.fixed_device();
        let (d, dtype) = model.fixed_output();
        let fed = offsets.last().copied().unwrap_or(0);
        let scratch = max_len - fed;
        if feed >= scratch {
            return Ok(None);
        }
        let n_pos = rows * fed + 1;
        let n_feed = if feed > 0 {
            FeedBlock::u32_len(rows, feed)
        } else {
            0
        };
        let pos = Tensor::zeros(n_pos + n_feed, DType::U32, dev)?;
        let n_masks = if feed > 0 { 2 } else { 1 };
        let masks = Tensor::zeros((n_masks * rows, 1, 1, max_len), DType::F32, dev)?;
        let block = if feed > 0 {
            let inputs = pos.narrow(0, n_pos, n_feed)?;
            let own = masks.narrow(0, rows, rows)?;
            Some(FeedBlock::new(model, rows, feed, scratch, &inputs, own)?)
        } else {
            None
        };
        Ok(Some(Self {
            scratch,
            rows,
            feats: Tensor::zeros((rows, 1 + fed, d), dtype, dev)?,
            prefix: masks.narrow(0, 0, rows)?,
            masks,
            filled: pos.narrow(0, rows * fed, 1)?,
            pos,
            offsets,
            feed: block,
        }))
    }

    /// The first slot after the filled length in use: the feed's block, else the scratch
    /// block.
    fn in_use_from(&self) -> usize {
        self.feed.as_ref().map_or(self.scratch, |f| f.at)
    }

    /// Whether a step fits: the cache's committed slots (and the step's feed) end before the
    /// slots in use and stage nothing (`false`: draft level by level); an error where the root
    /// features, the images or the feed do not match the computation (`step`'s root tokens,
    /// positions and features for `n_img` images).
    pub fn fits(&self, kv: &KvCache, step: &DraftStep, n_img: usize) -> Result<bool> {
        let width = step.feed.map_or(0, |f| f.width());
        let block = self.feed.as_ref().map_or(0, |b| b.width);
        if kv.len() + width > self.in_use_from() || width > block || kv.staging().is_some() {
            return Ok(false);
        }
        if step.root_feat.dims3()?.0 != self.rows
            || step.root_tokens.len() != n_img
            || step.roots.len() != n_img
        {
            return Err(Error::invalid(
                "drafting graph",
                "rows do not match the computation (internal error)",
            ));
        }
        if step.feed.is_some() && self.feed.is_none() {
            return Err(Error::invalid(
                "drafting graph",
                "a feed for a computation without its block (internal error)",
            ));
        }
        Ok(true)
    }

    /// Fed nodes per step.
    pub fn fed(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// The root's drafter output `[rows, 1, d]`.
    pub fn root_feat(&self) -> Result<Tensor> {
        Ok(self.feats.narrow(1, 0, 1)?.contiguous()?)
    }

    /// The features at `at` (indices into `feats` as `[rows * (1 + fed), d]`) as `[rows, k, d]`.
    pub fn gather_feats(&self, at: &Tensor, k: usize) -> Result<Tensor> {
        let d = self.feats.dim(2)?;
        Ok(self
            .feats
            .reshape((self.rows * (1 + self.fed()), d))?
            .index_select(at, 0)?
            .reshape((self.rows, k, d))?)
    }

    /// Runs the drafter on expansion `e`'s nodes (their K/V into the scratch block) and keeps
    /// its output in `feats`; returns it.
    pub fn expand(
        &self,
        model: &dyn FixedForward,
        kv: &mut KvCache,
        e: usize,
        ids: &Tensor,
        feats: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (off, kf) = (self.offsets[e], self.offsets[e + 1] - self.offsets[e]);
        // level-major: this level's rows are one contiguous view (no copy)
        let pos = self
            .pos
            .narrow(0, self.rows * off, self.rows * kf)?
            .reshape((self.rows, kf))?;
        let skip = (&self.filled, self.in_use_from());
        let out = staged_step(
            model,
            kv,
            self.scratch + off,
            skip,
            ids,
            Some(feats),
            &pos,
            mask,
        )?;
        self.feats.slice_set(&out, 1, 1 + off)?;
        Ok(out)
    }

    /// The roots' drafter outputs `[rows, 1, d]`: from the folded feed (run here, its K/V into
    /// its block) where the computation has one, else as the host wrote them.
    pub fn roots(&self, model: &dyn FixedForward, kv: &mut KvCache) -> Result<Tensor> {
        if let Some(f) = &self.feed {
            f.run(model, kv, &self.filled, &self.feats)?;
        }
        self.root_feat()
    }

    /// After a run: moves the step's fed pairs from the feed's block to the filled length.
    pub fn commit_feed(&self, kv: &mut KvCache, step: &DraftStep) -> Result<()> {
        match (&self.feed, step.feed) {
            (Some(b), Some(f)) => b.commit(kv, f.width()),
            _ => Ok(()),
        }
    }

    /// Writes one step's inputs (no synchronisation): `step`'s root features (or its feed),
    /// the prefix masks (the committed slots of row r as `prefix[r % n_img]` says, a feed's
    /// pairs at its block), the positions (expansion e of row r at `roots[r % n_img] + e`,
    /// clamped: `clamp.1` from `clamp.0` on), the filled length `kv_len` and the feed's inputs.
    pub fn write(
        &self,
        n_img: usize,
        step: &DraftStep,
        kv_len: usize,
        clamp: (usize, usize),
    ) -> Result<()> {
        let (root_feat, prefix, roots) = (step.root_feat, step.prefix, step.roots);
        let (rows, dev) = (self.rows, self.feats.device());
        let max_len = self.prefix.dim(3)?;
        if step.feed.is_none() {
            self.feats
                .slice_set(&root_feat.to_dtype(self.feats.dtype())?.contiguous()?, 1, 0)?;
        }
        let mut mask = vec![f32::NEG_INFINITY; self.masks.elem_count()];
        let (drafting, own) = mask.split_at_mut(rows * max_len);
        // committed slots as the prefix says (a feed's pairs at its block), hidden up to the
        // scratch block, where the tree masks decide
        let block = self.feed.as_ref().map(|b| (b.at, b.width));
        for (r, out) in drafting.chunks_exact_mut(max_len).enumerate() {
            let p = &prefix[r % n_img];
            let n = p.len().min(kv_len);
            out[..n].copy_from_slice(&p[..n]);
            if let Some((at, width)) = block {
                let fed = &p[n..p.len().min(n + width)];
                out[at..at + fed.len()].copy_from_slice(fed);
            }
            out[self.scratch..].fill(0.0);
        }
        if let Some(b) = &self.feed {
            for (r, out) in own.chunks_exact_mut(max_len).enumerate() {
                b.own_mask_row(&prefix[r % n_img], kv_len, out);
            }
            b.write_feats(step.feed)?;
        }
        self.masks
            .slice_set(&Tensor::from_vec(mask, self.masks.shape(), dev)?, 0, 0)?;
        let mut pos = Vec::with_capacity(self.pos.elem_count());
        for (e, w) in self.offsets.windows(2).enumerate() {
            for r in 0..rows {
                let p = roots[r % n_img] + e;
                let p = if p >= clamp.0 { clamp.1 } else { p };
                pos.extend(std::iter::repeat_n(p as u32, w[1] - w[0]));
            }
        }
        pos.push(kv_len as u32);
        if let Some(b) = &self.feed {
            pos.extend(b.u32_inputs(step.feed, rows)?);
        }
        self.pos
            .slice_set(&Tensor::from_vec(pos, self.pos.elem_count(), dev)?, 0, 0)?;
        Ok(())
    }
}

/// A drafting computation kept with its cache: its run and its CUDA graph.
pub(super) trait Drafting {
    /// Its graph (taken out while it replays).
    fn graph_mut(&mut self) -> &mut Captured;
    /// The computation (every temporary dropped before it returns).
    fn run(
        &self,
        model: &dyn FixedForward,
        lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
        kv: &mut KvCache,
    ) -> Result<()>;
}

/// The computation in `graphs` that `is_it` finds, else a new one from `make` (`None`: none
/// applies) in place of the oldest when `max` are kept.
pub(super) fn find_or_make<G>(
    graphs: &mut Vec<G>,
    is_it: impl Fn(&G) -> bool,
    max: usize,
    make: impl FnOnce() -> Result<Option<G>>,
) -> Result<Option<&mut G>> {
    let i = match graphs.iter().position(is_it) {
        Some(i) => i,
        None => {
            let Some(g) = make()? else {
                return Ok(None);
            };
            if graphs.len() >= max {
                graphs.remove(0);
            }
            graphs.push(g);
            graphs.len() - 1
        }
    };
    Ok(graphs.get_mut(i))
}

/// Replays `g`'s graph after its inputs were written (capturing it on first use when
/// `capture`, else running eagerly), with the loop profile's marks.
pub(super) fn replay_drafting<G: Drafting>(
    g: &mut G,
    model: &dyn FixedForward,
    kv: &mut KvCache,
    capture: bool,
    lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
    label: &str,
) -> Result<()> {
    crate::decode::profile::mark_here("draft: drafting inputs (host-built)")?;
    let mut graph = std::mem::take(g.graph_mut());
    let ran = {
        let this: &G = g;
        replay_or_capture(
            model.fixed_device(),
            capture,
            &mut graph,
            label,
            &mut || this.run(model, lm_head, kv),
        )
    };
    *g.graph_mut() = graph;
    ran?;
    crate::decode::profile::mark_here("draft: drafting graph")?;
    Ok(())
}

/// Drafts every image's tree of the static `shape` in one fixed-shape computation (captured on
/// the first call of its shape, replayed after), with the tokens, probabilities and draws of
/// [`super::draft::draft_static`] on the drafter `fx` and `lm_head` (the target's output head,
/// whose weights `key.lm_head` names). `None` where it does not apply (see
/// [`StaticDrafting::new`]; no room before the scratch block): then draft level by level.
pub fn draft_static_fixed(
    fx: FixedDrafting,
    lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
    key: DraftingKey,
    shape: &TreeShape,
    step: &DraftStep,
    rngs: &mut [&mut dyn RngCore],
) -> Result<Option<Drafted>> {
    let FixedDrafting {
        model,
        kv,
        graphs,
        capture,
        rope_rows,
        zero_row,
        ..
    } = fx;
    let greedy = key.sampling.is_greedy();
    let made = find_or_make(
        graphs,
        |g| g.key == key,
        MAX_DRAFTING_GRAPHS,
        || {
            let (rows, max_len) = (kv.batch(), kv.max_len());
            StaticDrafting::new(key.clone(), shape, model, rows, max_len, step.vocab)
        },
    )?;
    let Some(g) = made else {
        return Ok(None);
    };
    if !g.bufs.fits(kv, step, key.n_img)? {
        return Ok(None);
    }
    g.set_inputs(step, kv.len(), (rope_rows, zero_row), rngs)?;
    let label = format!("drafting of a {}-node shape", shape.len());
    replay_drafting(g, model, kv, capture, lm_head, &label)?;
    g.bufs.commit_feed(kv, step)?;
    // the drafted tokens in verification order (shape order, the root first), on the device
    let roots = Tensor::from_vec(step.root_tokens.to_vec(), (key.n_img, 1), g.picks.device())?;
    let drafted =
        picks::pick_tokens(&g.picks, &g.verify_at, 1)?.reshape((key.n_img, shape.len() - 1))?;
    Ok(Some(Drafted {
        ids: Tensor::cat(&[&roots, &drafted], 1)?,
        tree_mask: g.tree_mask.clone(),
        picks: g.picks.clone(),
        // the computation's own buffers, like the picks: acceptance reads its rows before the
        // next replay (no copy of every level's rows per step)
        probs: g.probs.clone(),
        plan: g.plan.clone(),
        greedy,
    }))
}

/// A static shape drafted on the device ([`draft_static_fixed`]): what verification needs is
/// there already; the trees are read when acceptance needs them ([`Drafted::trees`]), so that
/// verification can be queued before the host waits for the picks. It and its trees' sampled
/// drafter rows ([`QDist`] on the device) read the computation's buffers: valid until its next
/// replay (read a row with [`QDist::values`] to keep it longer).
pub struct Drafted {
    /// Verification ids `[n_img, nodes]` u32 in shape order, the root first (a dropped node
    /// holds token 0; it is in no tree, so acceptance never reads its column).
    pub ids: Tensor,
    /// The shape's additive tree mask `[1, nodes, nodes]` (a node sees its ancestors and itself).
    pub tree_mask: Tensor,
    picks: Tensor,
    probs: Vec<Tensor>,
    plan: Arc<Plan>,
    greedy: bool,
}

impl Drafted {
    /// Every image's tree (one transfer of every depth's picks) and, per tree, the shape node
    /// (verification column) of every tree node.
    pub fn trees(
        &self,
        shape: &TreeShape,
        root_tokens: &[u32],
    ) -> Result<(Vec<DraftTree>, Vec<Vec<usize>>)> {
        let flat: Vec<f32> = self.picks.to_vec1()?;
        let plan = &*self.plan;
        let picks: Vec<Vec<f32>> = plan
            .block_at
            .windows(2)
            .map(|w| flat[w[0]..w[1]].to_vec())
            .collect();
        let dist = |i: usize, gi: usize, row: usize| -> Result<QDist> {
            Ok(QDist::device(
                self.probs[i].clone(),
                gi * plan.level_rows[i] + row,
            ))
        };
        build_trees(
            shape,
            &plan.depths,
            root_tokens,
            self.greedy,
            &plan.ks,
            &dist,
            &picks,
        )
    }
}
