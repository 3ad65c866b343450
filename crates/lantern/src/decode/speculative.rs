//! Speculative decoding: draft a tree with the drafter, verify it in one target forward with a
//! tree attention mask, accept a path, compact the target cache, feed the drafter, repeat.
//!
//! Batches: every step each image drafts and verifies its own tree (one batched drafter call
//! per tree level, one batched target forward), then commits its own `accepted + 1` tokens,
//! capped by its remaining budget. Images thus advance independently: image g of a batch gets
//! the tokens, acceptances and tau of a single-image run with seed `seed + g` (its random
//! stream is its own).
//!
//! The caches keep one physical length for all batch rows (`slots.rs`): a step appends
//! `M = max over images of the committed counts` slots and an image that commits fewer marks
//! the rest as holes. Every forward hides an image's holes with a custom mask and runs at
//! per-row positions `[rows, s]` (the image's own logical positions). When the removable holes
//! reach a threshold (a quarter of the longest image, at least 8 slots), one gather per cache
//! layer moves each row's valid slots to the front. Finished images commit nothing (their rows
//! are still computed) until the last one is done.
//!
//! Device-to-host transfers per step do not grow with the batch. The drafter's distributions
//! (the root's and every drafted level's, all images at once) stay on the device; per level the
//! host gets only the picks of every image's nodes (one small transfer; two when sampling: the
//! positive counts that fix how many uniforms each draw takes, then the draws), and acceptance
//! copies a sampled node's distribution only when it visits the node. Where the device does not
//! serve the sampling filters (top-p < 1 on CUDA) each drafter call copies its logits instead.
//! The verification block is copied in one transfer while it is at most `HOST_BLOCK_BYTES` (1 MiB)
//! per image (else one transfer per row read).
use super::draft::{draft_static, Expand};
use super::draft_graph::{draft_static_fixed, DraftStep, Drafted, DraftingKey};
use super::dynamic::draft_dynamic;
use super::dynamic_graph::{draft_dynamic_fixed, DynamicDrafted, DynamicKey};
use super::feed::Feed;
use super::level::{DeviceLevel, DraftLevel, HostLevel, Want};
use super::model::{DecodeCache, DraftModel, Target, Visibility};
use super::profile::LoopProfile;
use super::slots::{gather_rows, row_values, BlockMask, Slots};
use super::static_trees::{TreeShape, TreeSpec};
use super::tree::DraftTree;
use super::{cfg_rows, to_host_f32, token_budget, DecodeStats, GenerateOptions, Output};
use crate::accept::{accept_tree, AcceptConfig, Neighbors, TargetRows};
use crate::fused::picks;
use crate::sampling::{row_probs, sample_index, SamplingParams};
use crate::{Error, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::borrow::Cow;
use std::rc::Rc;
use std::time::Instant;

/// Largest CFG-combined verification block per image (`[cols, V]` f32, in bytes) for which
/// the whole `[n_img, cols, V]` block is copied to the host in one transfer per step.
///
/// The trade-off is per image, since both sides grow with the batch: acceptance reads only a
/// few rows of an image (the accepted path and its tested children, about 1-4), and every
/// separate read is a device synchronisation (tens of microseconds on a GPU), while one
/// transfer of the block costs one synchronisation plus every row's bytes. The 1024-code
/// fashion model (57 nodes: 0.23 MB per image) copies its block; LlamaGen's 16384 codes
/// (59 nodes: 3.9 MB per image) read their rows one at a time (acceptance per GPT-XL step on
/// an H100: 1.7-2.0 -> 0.7-1.2 ms, docs/BENCHMARKS.md section 000b).
const HOST_BLOCK_BYTES: usize = 1 << 20;

/// The CFG-combined verification rows `[n_img, cols, V]` (tree node i is column i), logits or
/// probabilities ([`verify_rows`]): copied to the host in one transfer when an image's
/// `[cols, V]` is at most `max_bytes`, else left on the device and read one row at a time.
enum VerifyLogits {
    Host {
        data: Vec<f32>,
        cols: usize,
        vocab: usize,
    },
    Device(Tensor),
}

/// The verification rows of the output head's `logits` `[rows, cols, V]`, CFG-combined
/// `[n_img, cols, V]`, and whether they are probabilities: where the fused kernels run and
/// serve the sampling filters, CFG and the filters run in one kernel on the device (the rows of
/// [`row_probs`], so acceptance does no softmax per visited node on the host); else the
/// mixed logits.
fn verify_rows(
    logits: Tensor,
    n_img: usize,
    cfg: Option<f32>,
    sampling: &SamplingParams,
) -> Result<(Tensor, bool)> {
    let (_, cols, v) = logits.dims3()?;
    if v > 0 && crate::fused::active(&logits) && picks::probs_on_device(sampling, logits.device()) {
        let p = picks::draft_probs_cfg(&logits, n_img, cfg, sampling)?;
        return Ok((p.reshape((n_img, cols, v))?, true));
    }
    Ok((cfg_mix_device(logits, n_img, cfg)?, false))
}

impl VerifyLogits {
    fn new(mixed: Tensor, max_bytes: usize) -> Result<Self> {
        let (_, cols, vocab) = mixed.dims3()?;
        if cols * vocab * std::mem::size_of::<f32>() <= max_bytes {
            Ok(Self::Host {
                data: to_host_f32(&mixed)?,
                cols,
                vocab,
            })
        } else {
            Ok(Self::Device(mixed))
        }
    }

    /// Logits after column `node` of image g (one transfer of one row when not on the host).
    fn row(&self, g: usize, node: usize) -> Result<Cow<'_, [f32]>> {
        Ok(match self {
            Self::Host { data, cols, vocab } => {
                let at = (g * cols + node) * vocab;
                Cow::Borrowed(&data[at..at + vocab])
            }
            Self::Device(t) => Cow::Owned(to_host_f32(&t.i((g, node))?)?),
        })
    }
}

/// Target rows of one image, from the verification logits, computed on demand.
struct LazyRows<'a> {
    logits: &'a VerifyLogits,
    /// Whether the rows are probabilities already (else logits: [`row_probs`] on the host).
    probs: bool,
    g: usize,
    /// Verification column of every tree node.
    columns: &'a [usize],
    sampling: &'a SamplingParams,
}

impl TargetRows for LazyRows<'_> {
    fn row(&mut self, node: usize) -> Result<Vec<f32>> {
        // acceptance reads each node's row at most once: no memo (it cost a row copy per read)
        let Some(&col) = self.columns.get(node) else {
            return Err(Error::invalid(
                "tree node",
                format!("{node} is not in the verified tree (internal error)"),
            ));
        };
        crate::decode::profile::mark_here("accept: rules")?;
        let row = self.logits.row(self.g, col)?;
        crate::decode::profile::mark_here("accept: row reads")?;
        Ok(if self.probs {
            row.into_owned()
        } else {
            row_probs(self.sampling, &row)
        })
    }
}

/// CFG on the device: `[rows, s, V]` logits (any float dtype: combined in f32) to f32
/// `[n_img, s, V]` (`u + scale (c - u)`).
fn cfg_mix_device(logits: Tensor, n_img: usize, cfg: Option<f32>) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    Ok(match cfg {
        Some(scale) => {
            let c = logits.narrow(0, 0, n_img)?;
            let u = logits.narrow(0, n_img, n_img)?;
            (&u + ((&c - &u)? * scale as f64)?)?
        }
        None => logits,
    })
}

/// Per-image CFG'd drafter distributions of drafter features `[rows, s, d]` as a level of
/// `s` rows per image: made and kept on the device (CFG, then the sampling filters, see
/// [`picks::draft_probs`]) so that builders fetch only their picks; on the host (one transfer
/// of the logits) where the device does not serve the filters.
fn drafter_level<T: Target>(
    target: &T,
    feats: &Tensor,
    n_img: usize,
    cfg: Option<f32>,
    sampling: &SamplingParams,
) -> Result<Box<dyn DraftLevel>> {
    let logits = target.lm_head_raw(feats)?;
    let (_, s, v) = logits.dims3()?;
    if v > 0 && picks::probs_on_device(sampling, logits.device()) {
        // CFG combined inside the probabilities kernel (no mixed logits materialised)
        let probs = picks::draft_probs_cfg(&logits, n_img, cfg, sampling)?;
        return Ok(Box::new(DeviceLevel::new(probs, s)?));
    }
    let mixed = cfg_mix_device(logits, n_img, cfg)?;
    let flat = to_host_f32(&mixed)?;
    if v == 0 {
        return Ok(Box::new(HostLevel::new(vec![vec![Vec::new(); s]; n_img])));
    }
    let mut rows = flat.chunks_exact(v).map(|l| row_probs(sampling, l));
    Ok(Box::new(HostLevel::new(
        (0..n_img)
            .map(|_| rows.by_ref().take(s).collect())
            .collect(),
    )))
}

/// A drafting level whose pick requests are marked in the loop profile.
struct ProfiledLevel {
    inner: Box<dyn DraftLevel>,
    prof: Rc<LoopProfile>,
}

impl DraftLevel for ProfiledLevel {
    fn vocab(&self) -> usize {
        self.inner.vocab()
    }

    fn pick_block(&mut self, want: &[Want], uniforms: Option<Vec<f64>>) -> Result<Tensor> {
        self.prof.mark("draft: tree building")?;
        let r = self.inner.pick_block(want, uniforms)?;
        self.prof.mark("draft: picks")?;
        Ok(r)
    }

    fn dist(&self, g: usize, row: usize) -> Result<super::tree::QDist> {
        self.inner.dist(g, row)
    }
}

/// `level`, marked in `prof` when the profile is on.
fn profiled(level: Box<dyn DraftLevel>, prof: &Rc<LoopProfile>) -> Box<dyn DraftLevel> {
    if prof.is_on() {
        Box::new(ProfiledLevel {
            inner: level,
            prof: prof.clone(),
        })
    } else {
        level
    }
}

/// Repeats per-image lists for every batch row (row r is image `r % n_img`).
fn per_row(lists: &[Vec<usize>], rows: usize) -> Vec<Vec<usize>> {
    (0..rows).map(|r| lists[r % lists.len()].clone()).collect()
}

/// The drafter side of one tree: the committed slots in the drafter cache plus the nodes fed
/// so far.
struct DraftSession<'a, T: Target, D: DraftModel> {
    target: &'a T,
    drafter: &'a D,
    cache: &'a mut D::Cache,
    n_img: usize,
    cfg: Option<f32>,
    sampling: SamplingParams,
    /// Mask of every image over the committed slots (physical length `stable`).
    prefix: &'a [Vec<f32>],
    /// Drafter cache length of the committed slots.
    stable: usize,
    /// Logical position of every image's root.
    roots: &'a [usize],
    /// Drafter output after the root `[rows, 1, d]`, then every fed node.
    feats: Tensor,
    /// For every image and fed node: fed indices of its ancestors and itself.
    anc: Vec<Vec<Vec<usize>>>,
    levels: usize,
    forwards: usize,
    prof: Rc<LoopProfile>,
}

impl<T: Target, D: DraftModel> Expand for DraftSession<'_, T, D> {
    fn expand(
        &mut self,
        tokens: &Tensor,
        parents: &[Vec<Option<usize>>],
    ) -> Result<Box<dyn DraftLevel>> {
        let dev = self.feats.device().clone();
        let rows = self.feats.dim(0)?;
        let k = tokens.dim(1)?;
        let n_fed = self.anc.first().map_or(0, |a| a.len());
        let past = self.cache.len();
        if past != self.stable + n_fed {
            return Err(Error::invalid(
                "drafter cache",
                format!(
                    "length {past}, expected {} (internal error)",
                    self.stable + n_fed
                ),
            ));
        }
        // every image's tokens for each of its rows (the CFG halves repeat the images)
        let ids = tokens
            .to_device(&dev)?
            .to_dtype(DType::U32)?
            .repeat((rows / self.n_img, 1))?;
        let src: Vec<Vec<usize>> = parents
            .iter()
            .map(|ps| ps.iter().map(|p| p.map_or(0, |i| i + 1)).collect())
            .collect();
        let feats = gather_rows(&self.feats, &src, self.n_img)?;
        let pos: Vec<Vec<u32>> = self
            .roots
            .iter()
            .map(|&r| vec![(r + self.levels) as u32; k])
            .collect();
        let pos = row_values(&pos, rows, &dev)?;
        let mut new_anc = vec![Vec::with_capacity(k); self.n_img];
        for (g, (ps, out)) in parents.iter().zip(new_anc.iter_mut()).enumerate() {
            for (i, p) in ps.iter().enumerate() {
                let mut a = p.map_or_else(Vec::new, |p| self.anc[g][p].clone());
                a.push(n_fed + i);
                out.push(a);
            }
        }
        // prefix: committed slots, then every fed node (visible when an ancestor)
        let prefix: Vec<Vec<f32>> = self
            .prefix
            .iter()
            .map(|p| {
                let mut v = p.clone();
                v.resize(past, f32::NEG_INFINITY);
                v
            })
            .collect();
        let mut mask = BlockMask::new(&prefix, k, |_, i, j| j == i);
        for (g, anc) in new_anc.iter().enumerate() {
            for (i, a) in anc.iter().enumerate() {
                for &j in a {
                    mask.show(g, i, self.stable + j);
                }
            }
        }
        let mask = mask.into_tensor(rows, &dev)?;
        self.prof
            .mark("draft: level inputs (ids, features, positions, mask)")?;
        let out =
            self.drafter
                .forward(&ids, &feats, &pos, &Visibility::Custom(mask), self.cache)?;
        self.prof.mark("draft: drafter forward")?;
        self.forwards += 1;
        self.levels += 1;
        for (g, a) in new_anc.into_iter().enumerate() {
            self.anc[g].extend(a);
        }
        self.feats = Tensor::cat(&[&self.feats, &out], 1)?;
        let level = drafter_level(self.target, &out, self.n_img, self.cfg, &self.sampling)?;
        self.prof.mark("draft: LM head, CFG, probabilities")?;
        Ok(profiled(level, &self.prof))
    }
}

/// The inputs of one batched target forward over every image's tree: node i of image g is
/// column i (its position `roots[g] + depth`, visible: the image's committed slots and the
/// node's path); columns past a smaller tree repeat the root and see only the committed slots
/// and themselves. Returns ids `[rows, cols]`, per-row positions and the visibility.
fn verify_inputs(
    trees: &[DraftTree],
    prefix: &[Vec<f32>],
    roots: &[usize],
    rows: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, Visibility)> {
    let n_img = trees.len();
    let ncols = trees.iter().map(|t| t.len()).max().unwrap_or(1);
    let mut ids = vec![0u32; n_img * ncols];
    let mut pos = vec![vec![0u32; ncols]; n_img];
    // the tree part only (the committed slots' part is broadcast on the device)
    let mut tree = vec![f32::NEG_INFINITY; n_img * ncols * ncols];
    for (g, tr) in trees.iter().enumerate() {
        let t = &mut tree[g * ncols * ncols..(g + 1) * ncols * ncols];
        for c in 0..ncols {
            let node = if c < tr.len() { c } else { 0 };
            ids[g * ncols + c] = tr.tokens[node];
            pos[g][c] = (roots[g] + tr.depths[node]) as u32;
            t[c * ncols + c] = 0.0;
        }
        for i in 0..tr.len() {
            for a in tr.path_to(i) {
                t[i * ncols + a] = 0.0;
            }
        }
    }
    let halves = rows / n_img;
    let ids = Tensor::from_vec(ids, (n_img, ncols), dev)?.repeat((halves, 1))?;
    let tree = Tensor::from_vec(tree, (n_img, ncols, ncols), dev)?;
    let mask = verify_mask(prefix, &tree, rows, dev)?;
    let pos = row_values(&pos, rows, dev)?;
    Ok((ids, pos, Visibility::Custom(mask)))
}

/// The verification mask `[rows, n, past + n]`: image g's committed slots (`prefix[g]`, `past`
/// each), then its tree part (`tree` `[n_img, n, n]`, or `[1, n, n]` shared), repeated for the
/// CFG halves. Only the prefix rows and the tree part are uploaded.
fn verify_mask(prefix: &[Vec<f32>], tree: &Tensor, rows: usize, dev: &Device) -> Result<Tensor> {
    let (n_img, n) = (prefix.len(), tree.dim(1)?);
    let past = prefix.first().map_or(0, |p| p.len());
    let pre =
        Tensor::from_vec(prefix.concat(), (n_img, 1, past), dev)?.broadcast_as((n_img, n, past))?;
    let tree = tree.broadcast_as((n_img, n, n))?;
    Ok(Tensor::cat(&[&pre, &tree], 2)?.repeat((rows / n_img, 1, 1))?)
}

/// One step's draft: a static shape drafted on the device or dynamic trees drafted and chosen
/// there (their trees read after verification is queued), or trees built on the host level by
/// level.
enum StepTrees<'a> {
    OnDevice(Drafted, &'a TreeShape),
    Chosen(DynamicDrafted),
    Host(Vec<DraftTree>),
}

/// Whether dynamic trees may be drafted in one computation: `LANTERN_DYNAMIC_GRAPH=0` drafts
/// them level by level (the host choosing each frontier), for A/B runs.
fn dynamic_graphs_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_DYNAMIC_GRAPH").as_deref() != Ok("0"))
}

/// Whether verification defers its staged block to the compaction (see
/// [`DecodeCache::defer_commit`]): `LANTERN_DEFER_COMMIT=0` commits the whole block first, for
/// A/B runs.
fn defer_commits() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_DEFER_COMMIT").as_deref() != Ok("0"))
}

/// Whether the drafter feed is folded into the next step's drafting computation (see
/// [`super::feed`]): `LANTERN_FOLD_FEED=0` feeds on its own right after acceptance, for A/B
/// runs.
fn feed_folding_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_FOLD_FEED").as_deref() != Ok("0"))
}

/// Pairs per row of a drafter feed folded into `tree`'s drafting computations: the most a step
/// commits (its deepest drafted node's path plus the next token); 0 where folding is off.
pub fn folded_feed_width(tree: &TreeSpec) -> usize {
    if !feed_folding_on() {
        return 0;
    }
    match tree {
        TreeSpec::Static(s) => s.max_depth() + 1,
        TreeSpec::Dynamic(p) => p.depth + 2,
    }
}

/// Whether trees (static and dynamic) may be drafted in one computation (tests turn it off to
/// compare with the level-by-level path on the same target path).
fn drafting_graphs_on() -> bool {
    #[cfg(test)]
    {
        tests::DRAFTING_GRAPHS.with(|c| c.get())
    }
    #[cfg(not(test))]
    {
        true
    }
}

/// [`verify_inputs`] of a static shape drafted on the device: every image verifies the whole
/// shape (node i is column i, position `roots[g] + depth`), ids from the drafted picks, the
/// mask the committed slots of `prefix` then the shape's tree mask (a dropped node's column is
/// verified and never read). Only the positions and the prefix come from the host.
fn drafted_verify_inputs(
    d: &Drafted,
    shape: &TreeShape,
    prefix: &[Vec<f32>],
    roots: &[usize],
    rows: usize,
) -> Result<(Tensor, Tensor, Visibility)> {
    let dev = d.ids.device();
    let n_img = prefix.len();
    let pos: Vec<Vec<u32>> = roots
        .iter()
        .map(|&r| shape.depths.iter().map(|&x| (r + x) as u32).collect())
        .collect();
    let pos = row_values(&pos, rows, dev)?;
    let mask = verify_mask(prefix, &d.tree_mask, rows, dev)?;
    let ids = d.ids.repeat((rows / n_img, 1))?;
    Ok((ids, pos, Visibility::Custom(mask)))
}

/// [`verify_inputs`] of dynamic trees chosen on the device: ids, positions and tree masks as
/// the device wrote them; only the prefix comes from the host.
fn chosen_verify_inputs(
    d: &DynamicDrafted,
    prefix: &[Vec<f32>],
    rows: usize,
) -> Result<(Tensor, Tensor, Visibility)> {
    let halves = rows / prefix.len().max(1);
    let ids = d.ids()?.repeat((halves, 1))?;
    let pos = d.positions()?.repeat((halves, 1))?;
    let tree = d.tree_mask()?;
    let mask = verify_mask(prefix, &tree, rows, tree.device())?;
    Ok((ids, pos, Visibility::Custom(mask)))
}

/// Runs speculative decoding (see the module docs).
pub fn generate_speculative<T: Target, D: DraftModel>(
    target: &T,
    drafter: &D,
    cond: &T::Condition,
    opts: &GenerateOptions,
    tree_spec: &TreeSpec,
    accept: &AcceptConfig,
    neighbors: Option<&Neighbors>,
) -> Result<Output> {
    let plan = Plan {
        tree_spec,
        accept,
        neighbors,
        fixed_threshold: None,
        host_block_bytes: HOST_BLOCK_BYTES,
    };
    Ok(run(target, drafter, cond, opts, &plan)?.0)
}

/// The speculative settings of one run.
struct Plan<'a> {
    tree_spec: &'a TreeSpec,
    accept: &'a AcceptConfig,
    neighbors: Option<&'a Neighbors>,
    /// Compaction threshold override (tests).
    fixed_threshold: Option<usize>,
    /// Largest verification block per image copied to the host at once ([`HOST_BLOCK_BYTES`]; tests
    /// lower it to exercise the per-row path).
    host_block_bytes: usize,
}

/// [`generate_speculative`]; also returns the number of compactions.
fn run<T: Target, D: DraftModel>(
    target: &T,
    drafter: &D,
    cond: &T::Condition,
    opts: &GenerateOptions,
    plan: &Plan,
) -> Result<(Output, usize)> {
    let (tree_spec, accept, neighbors) = (plan.tree_spec, plan.accept, plan.neighbors);
    tree_spec.validate()?;
    let n_img = target.num_images(cond);
    if n_img == 0 {
        return Err(Error::invalid("condition", "no images (give at least one)"));
    }
    let budget = token_budget(target, opts)?;
    let cfg = opts.uses_cfg().then_some(opts.cfg_scale);
    let rows = if cfg.is_some() { 2 * n_img } else { n_img };
    let cls = target.cond_len();
    let greedy = opts.sampling.is_greedy();
    let mut acc_cfg = *accept;
    acc_cfg.greedy = greedy;
    let (max_cols, max_fed) = match tree_spec {
        TreeSpec::Dynamic(p) => (p.total_tokens, p.depth * p.top_k.min(target.vocab_size())),
        TreeSpec::Static(s) => (s.len(), s.len()),
    };
    let mut rngs: Vec<StdRng> = (0..n_img)
        .map(|g| StdRng::seed_from_u64(opts.seed.wrapping_add(g as u64)))
        .collect();
    // At a step's start the caches hold at most `cls + budget - 1` committed slots plus fewer
    // holes than the compaction threshold; a step appends at most a tree (target) or the fed
    // nodes (drafter), and the committed block is no longer than a tree. One more block of
    // room lets the fixed-shape steps keep their staging block (graph_step.rs) behind the
    // filled slots until the last step, so that every step replays its CUDA graph (without it
    // the last `tree` tokens of an image fell back to the ordinary forward).
    let mut slots = Slots::new(n_img, cls).with_threshold(plan.fixed_threshold);
    let slack = if n_img > 1 {
        slots.threshold(cls + budget)
    } else {
        0
    };
    let fed = max_fed.max(max_cols);
    let mut tcache = target.new_cache(rows, cls + budget + slack + 2 * max_cols)?;
    let mut dcache = drafter.new_cache(rows, cls + budget + slack + 2 * fed)?;
    let (mut t_draft, mut t_verify, mut t_accept) = (0.0f64, 0.0f64, 0.0f64);

    // prefill and first token
    let t = Instant::now();
    let hidden = target.prefill(cond, cfg.is_some(), &mut tcache)?;
    let logits = target.lm_head(&hidden.narrow(1, cls - 1, 1)?)?;
    t_verify += t.elapsed().as_secs_f64();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(budget); n_img];
    let first = cfg_rows(&logits, n_img, 0, cfg)?;
    for (g, (toks, row)) in tokens.iter_mut().zip(first).enumerate() {
        let p = opts.sampling.probs(&row);
        toks.push(sample_index(&p, &mut rngs[g]) as u32);
    }
    let dev: Device = hidden.device().clone();

    // first drafter feed: (feature j, token j+1) over the condition positions
    let t = Instant::now();
    let ids: Vec<u32> = (0..rows)
        .flat_map(|r| {
            let mut v = vec![0u32; cls];
            v[cls - 1] = tokens[r % n_img][0];
            v
        })
        .collect();
    let ids = Tensor::from_vec(ids, (rows, cls), &dev)?;
    let pos = Tensor::arange(0u32, cls as u32, &dev)?;
    let out = drafter.forward(&ids, &hidden, &pos, &Visibility::Causal, &mut dcache)?;
    let mut drafter_forwards = 1;
    let mut root_feat = out.narrow(1, cls - 1, 1)?;
    t_draft += t.elapsed().as_secs_f64();

    // the last step's committed pairs while the drafter has not been fed them (a folded feed
    // waits for the next drafting computation)
    let fold = folded_feed_width(tree_spec);
    let mut pending: Option<Feed> = None;
    let mut compactions = 0;
    let mut steps: Vec<Vec<usize>> = vec![Vec::new(); n_img];
    let mut tvds: Vec<Vec<f32>> = vec![Vec::new(); n_img];
    let prof = Rc::new(LoopProfile::from_env(&dev));
    prof.restart()?;
    while tokens.iter().any(|t| t.len() < budget) {
        if slots.should_compact() {
            // a pending feed first: the compaction moves the drafter's entries of every slot
            if let Some(f) = pending.take() {
                let t = Instant::now();
                root_feat = f.run(drafter, &mut dcache)?;
                drafter_forwards += 1;
                t_draft += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let lists = per_row(&slots.compact(), rows);
            tcache.keep(0, &lists)?;
            dcache.keep(0, &lists)?;
            compactions += 1;
            prof.mark("accept: hole compaction")?;
            prof.end_phase()?;
            t_accept += t.elapsed().as_secs_f64();
        }
        let phys = slots.len();
        let roots: Vec<usize> = tokens.iter().map(|t| cls + t.len() - 1).collect();
        let unfed = pending.as_ref().map_or(0, |f| f.width());
        if tcache.len() != phys
            || dcache.len() + unfed != phys
            || (0..n_img).any(|g| slots.count(g) != roots[g])
        {
            return Err(Error::invalid(
                "cache",
                format!(
                    "target/drafter lengths {}/{}, slots {phys} (internal error)",
                    tcache.len(),
                    dcache.len()
                ),
            ));
        }
        let prefix: Vec<Vec<f32>> = (0..n_img).map(|g| slots.mask_row(g)).collect();
        let holes = slots.has_holes();
        let root_tokens: Vec<u32> = tokens.iter().map(|t| *t.last().unwrap_or(&0)).collect();

        let t = Instant::now();
        prof.mark("step inputs (slots, prefix masks)")?;
        // draft: a static or dynamic tree in one fixed-shape computation where the models have
        // one, else level by level
        let step = DraftStep {
            root_tokens: &root_tokens,
            root_feat: &root_feat,
            prefix: &prefix,
            roots: &roots,
            vocab: target.vocab_size(),
            feed: pending.as_ref(),
        };
        let graphs_on = picks::probs_on_device(&opts.sampling, &dev) && drafting_graphs_on();
        let fixed = match (graphs_on, target.lm_head_id()) {
            (true, Some(lm_head)) => {
                let head = |h: &Tensor| target.lm_head_raw(h);
                match (tree_spec, drafter.fixed_drafting(&mut dcache)) {
                    (TreeSpec::Static(shape), Some(fx)) => {
                        let key = DraftingKey {
                            paths: shape.paths.clone(),
                            n_img,
                            cfg,
                            sampling: opts.sampling,
                            lm_head,
                            feed: fold,
                        };
                        let mut r: Vec<&mut dyn RngCore> =
                            rngs.iter_mut().map(|r| r as &mut dyn RngCore).collect();
                        draft_static_fixed(fx, &head, key, shape, &step, &mut r)?.map(|d| {
                            drafter_forwards += shape.max_depth().saturating_sub(1);
                            StepTrees::OnDevice(d, shape)
                        })
                    }
                    (TreeSpec::Dynamic(p), Some(fx)) if dynamic_graphs_on() => {
                        let key = DynamicKey {
                            params: *p,
                            n_img,
                            cfg,
                            sampling: opts.sampling,
                            lm_head,
                            feed: fold,
                        };
                        draft_dynamic_fixed(fx, &head, key, &step)?.map(|d| {
                            #[cfg(test)]
                            tests::DYNAMIC_FIXED.with(|c| c.set(c.get() + 1));
                            drafter_forwards += p.depth;
                            StepTrees::Chosen(d)
                        })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        // the verification inputs: made on the device from a drafted static shape (verification
        // is queued before the host reads the picks), else from the host trees
        let drafted = if let Some(drafted) = fixed {
            // the computation fed the drafter first
            if pending.take().is_some() {
                #[cfg(test)]
                tests::FOLDED_FEEDS.with(|c| c.set(c.get() + 1));
                drafter_forwards += 1;
            }
            drafted
        } else {
            if let Some(f) = pending.take() {
                root_feat = f.run(drafter, &mut dcache)?;
                drafter_forwards += 1;
            }
            let root = profiled(
                drafter_level(target, &root_feat, n_img, cfg, &opts.sampling)?,
                &prof,
            );
            prof.mark("draft: LM head, CFG, probabilities")?;
            let mut session = DraftSession {
                target,
                drafter,
                cache: &mut dcache,
                n_img,
                cfg,
                sampling: opts.sampling,
                prefix: &prefix,
                stable: phys,
                roots: &roots,
                feats: root_feat.clone(),
                anc: vec![Vec::new(); n_img],
                levels: 0,
                forwards: 0,
                prof: prof.clone(),
            };
            let trees = match tree_spec {
                TreeSpec::Dynamic(p) => draft_dynamic(p, &root_tokens, root, &mut session)?,
                TreeSpec::Static(shape) => {
                    let mut r: Vec<&mut dyn RngCore> =
                        rngs.iter_mut().map(|r| r as &mut dyn RngCore).collect();
                    draft_static(shape, &root_tokens, root, greedy, &mut session, &mut r)?
                }
            };
            drafter_forwards += session.forwards;
            StepTrees::Host(trees)
        };
        dcache.truncate(phys)?;
        prof.mark("draft: tree building")?;
        prof.end_phase()?;
        t_draft += t.elapsed().as_secs_f64();

        // verify all trees in one forward
        let t = Instant::now();
        let (ids, pos, vis) = match &drafted {
            StepTrees::OnDevice(d, shape) => {
                drafted_verify_inputs(d, shape, &prefix, &roots, rows)?
            }
            StepTrees::Chosen(d) => chosen_verify_inputs(d, &prefix, rows)?,
            StepTrees::Host(trees) => verify_inputs(trees, &prefix, &roots, rows, &dev)?,
        };
        prof.mark("verify: inputs (ids, positions, tree mask)")?;
        // the verified block is compacted next: its kept entries are gathered from the
        // staging slots (no copy of the whole block first)
        tcache.defer_commit(defer_commits());
        let hidden = target.forward_tokens(&ids, &pos, &vis, &mut tcache);
        tcache.defer_commit(false);
        let hidden = hidden?;
        prof.mark("verify: target forward")?;
        let (rows_cfg, probs) =
            verify_rows(target.lm_head_raw(&hidden)?, n_img, cfg, &opts.sampling)?;
        prof.mark("verify: LM head, CFG (and probabilities)")?;
        prof.end_phase()?;
        t_verify += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let logits = VerifyLogits::new(rows_cfg, plan.host_block_bytes)?;
        prof.mark("accept: verification block to host")?;
        // the trees, and the verification column of every tree node
        let (trees, columns) = match drafted {
            StepTrees::OnDevice(d, shape) => {
                let t_trees = Instant::now();
                let r = d.trees(shape, &root_tokens)?;
                // drafting's own work, done here so that verification was queued first
                t_draft += t_trees.elapsed().as_secs_f64();
                r
            }
            StepTrees::Chosen(d) => {
                let t_trees = Instant::now();
                let trees = d.trees()?;
                t_draft += t_trees.elapsed().as_secs_f64();
                let cols = trees.iter().map(|t| (0..t.len()).collect()).collect();
                (trees, cols)
            }
            StepTrees::Host(trees) => {
                let cols = trees.iter().map(|t| (0..t.len()).collect()).collect();
                (trees, cols)
            }
        };
        prof.mark("accept: picks to host, trees")?;
        #[cfg(test)]
        tests::record(&trees);

        // accept: every unfinished image commits its own path
        let mut kept: Vec<Vec<usize>> = Vec::with_capacity(n_img);
        let mut emitted: Vec<Vec<u32>> = Vec::with_capacity(n_img);
        for g in 0..n_img {
            let left = budget - tokens[g].len();
            if left == 0 {
                kept.push(Vec::new());
                emitted.push(Vec::new());
                continue;
            }
            let mut lazy = LazyRows {
                logits: &logits,
                probs,
                g,
                columns: &columns[g],
                sampling: &opts.sampling,
            };
            let d = accept_tree(&trees[g], &mut lazy, &acc_cfg, neighbors, &mut rngs[g])?;
            let m = (d.accepted.len() + 1).min(left);
            // the verification columns (cache slots of the block) of the kept nodes
            let mut k = vec![0];
            k.extend(d.accepted[..m - 1].iter().map(|&n| columns[g][n]));
            let mut seq: Vec<u32> = d.accepted.iter().map(|&n| trees[g].tokens[n]).collect();
            seq.push(d.next_token);
            seq.truncate(m);
            tvds[g].extend(d.tvd.iter().take(m));
            steps[g].push(m);
            kept.push(k);
            emitted.push(seq);
        }
        prof.mark("accept: rules")?;
        let counts: Vec<usize> = kept.iter().map(|k| k.len()).collect();
        let width = counts.iter().copied().max().unwrap_or(0);
        // pad to one length; the padding slots are holes
        let padded: Vec<Vec<usize>> = kept
            .iter()
            .map(|k| {
                let mut k = k.clone();
                k.resize(width, 0);
                k
            })
            .collect();
        tcache.keep(phys, &per_row(&padded, rows))?;
        slots.push_block(&counts, width);
        for (toks, e) in tokens.iter_mut().zip(&emitted) {
            toks.extend_from_slice(e);
        }
        prof.mark("accept: KV compaction of the accepted path")?;
        prof.end_phase()?;
        t_accept += t.elapsed().as_secs_f64();
        if tokens.iter().all(|t| t.len() >= budget) {
            break;
        }

        // the drafter's feed: the committed (feature, next token) pairs, run now or folded
        // into the next step's drafting computation
        let t = Instant::now();
        let feed = Feed {
            feats: gather_rows(&hidden, &padded, n_img)?,
            ids: emitted
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.resize(width, 0);
                    e
                })
                .collect(),
            pos: (0..n_img)
                .map(|g| {
                    (0..width)
                        .map(|i| (roots[g] + i.min(counts[g].saturating_sub(1))) as u32)
                        .collect()
                })
                .collect(),
            counts,
            prefix: holes.then_some(prefix),
        };
        prof.mark("feed: features gathered")?;
        if fold > 0 {
            pending = Some(feed);
        } else {
            root_feat = feed.run(drafter, &mut dcache)?;
            drafter_forwards += 1;
        }
        prof.end_phase()?;
        t_draft += t.elapsed().as_secs_f64();
    }
    if prof.is_on() {
        let n = steps.iter().map(|s| s.len()).max().unwrap_or(0);
        eprintln!("{}", prof.report(n));
    }
    let stats = tvds
        .iter()
        .zip(steps)
        .map(|(tv, steps)| {
            let mut s = DecodeStats {
                target_forwards: 1 + steps.len(),
                drafter_forwards,
                accepted_per_step: steps,
                time_draft: t_draft,
                time_verify: t_verify,
                time_accept: t_accept,
                ..Default::default()
            };
            s.finish(tv);
            s
        })
        .collect();
    Ok((Output { tokens, stats }, compactions))
}

#[cfg(test)]
mod tests {
    //! Compaction on the tiny LlamaGen fixtures (`tests/fixtures/gpt`): with a threshold of one
    //! hole every step that leaves holes compacts both caches, and every image must still
    //! equal its single-image run.
    use super::*;
    use crate::decode::{ar::generate_ar, Decoding};
    use crate::load::{load_drafter, load_llamagen};
    use crate::models::drafter::{Drafter, DrafterConfig};
    use crate::models::llamagen::{Condition, Config, LlamaGen};
    use candle_core::DType;
    use std::path::PathBuf;

    thread_local! {
        /// Whether trees are drafted in one computation on this thread.
        pub(super) static DRAFTING_GRAPHS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
        /// Steps whose dynamic trees were drafted in one computation on this thread.
        pub(super) static DYNAMIC_FIXED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Steps whose drafting computation fed the drafter the last step's tokens (folded feed)
        /// on this thread.
        pub(super) static FOLDED_FEEDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Every step's trees of the runs on this thread, while recording.
        static TREES: std::cell::RefCell<Option<Vec<Vec<DraftTree>>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Keeps a step's trees when this thread records; their sampled drafter rows are read
    /// now (a drafting computation's rows are overwritten by its next replay).
    pub(super) fn record(trees: &[DraftTree]) {
        TREES.with(|t| {
            if let Some(v) = t.borrow_mut().as_mut() {
                for q in trees.iter().flat_map(|t| t.q_dists.iter().flatten()) {
                    q.values().expect("a drafter row to the host");
                }
                v.push(trees.to_vec());
            }
        });
    }

    /// The trees of every step of `f`'s runs.
    fn recorded(f: impl FnOnce() -> Result<()>) -> Result<Vec<Vec<DraftTree>>> {
        TREES.with(|t| *t.borrow_mut() = Some(Vec::new()));
        let r = f();
        let trees = TREES.with(|t| t.borrow_mut().take()).unwrap_or_default();
        r.map(|_| trees)
    }

    /// The trees of every step of `go`'s runs drafted level by level (the drafter fed on its
    /// own), then in one computation (the feed folded into it, see [`super::super::feed`]; both
    /// on the fixed-shape target path, forced here on the CPU: only drafting differs), how many
    /// steps of the second run drafted a dynamic tree in one computation, and how many folded
    /// the feed in (none may in the first run).
    fn levels_then_computation(go: impl Fn() -> Result<()>) -> Result<TwoRuns> {
        use crate::decode::graph_step::force_fixed_shape;
        let folded = || FOLDED_FEEDS.with(|c| c.get());
        force_fixed_shape(true);
        DRAFTING_GRAPHS.with(|c| c.set(false));
        let before = folded();
        let levels = recorded(&go);
        assert_eq!(
            folded(),
            before,
            "a feed folded into level-by-level drafting"
        );
        DRAFTING_GRAPHS.with(|c| c.set(true));
        let before = (DYNAMIC_FIXED.with(|c| c.get()), folded());
        let fixed = recorded(&go);
        let ran = DYNAMIC_FIXED.with(|c| c.get()) - before.0;
        let feeds = folded() - before.1;
        force_fixed_shape(false);
        Ok((levels?, fixed?, ran, feeds))
    }

    /// Level-by-level trees, one-computation trees (per step, per image), dynamic steps drafted
    /// in one computation, steps that folded the feed into it.
    type TwoRuns = (Vec<Vec<DraftTree>>, Vec<Vec<DraftTree>>, usize, usize);

    /// Static trees drafted in one fixed-shape computation (forced here on the CPU) equal the
    /// level-by-level ones of every step (both runs on the fixed-shape target path): tokens,
    /// parents, q and the sampled nodes' drafter distributions (to rounding), greedy and
    /// sampled (top-k 3: nodes run out of mass and are dropped), with CFG over two images.
    #[test]
    fn drafting_computation_equals_level_by_level_drafting() -> Result<()> {
        let m = c2i_model()?;
        let d = drafter(true)?;
        let cond = Condition::Classes(vec![7, 3]);
        let tree = TreeSpec::parse("naive_extend_57")?;
        let accept = AcceptConfig::default();
        let sampled = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
        };
        for sampling in [SamplingParams::greedy(), SamplingParams::default(), sampled] {
            let opts = GenerateOptions::new().with_sampling(sampling).with_seed(5);
            let go =
                || generate_speculative(&m, &d, &cond, &opts, &tree, &accept, None).map(|_| ());
            let (levels, fixed, _, feeds) = levels_then_computation(go)?;
            assert!(levels.len() > 3, "{sampling:?}: {} steps", levels.len());
            assert_eq!(fixed.len(), levels.len(), "{sampling:?}");
            // every step after the first folds the feed in, but those that compacted first
            // (two images: holes)
            assert!(
                feeds * 2 >= fixed.len() && feeds < fixed.len(),
                "{sampling:?}: {feeds} folded feeds in {} steps",
                fixed.len()
            );
            // a dropped node changes the verification block's width (the device-built
            // inputs keep its column), whose rounding reaches later steps' features: values
            // are compared up to the first step with one, the trees' structure at every step
            let n = tree_len(&tree);
            let clean = levels
                .iter()
                .position(|s| s.iter().any(|t| t.len() < n))
                .unwrap_or(levels.len());
            for (i, (a, b)) in fixed.iter().zip(&levels).enumerate() {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    let at = format!("{sampling:?}, step {i}");
                    assert_eq!(
                        (&x.tokens, &x.parents, &x.depths, x.kind),
                        (&y.tokens, &y.parents, &y.depths, y.kind),
                        "{at}"
                    );
                    if i > clean {
                        continue;
                    }
                    // equal up to rounding (the drafter's sums run over other cache slots)
                    let close = |a: &[f32], b: &[f32]| {
                        for (a, b) in a.iter().zip(b) {
                            let tol = 1e-5 * a.abs().max(b.abs()) + 1e-7;
                            assert!((a - b).abs() <= tol, "{at}: {a} vs {b}");
                        }
                    };
                    close(&x.q, &y.q);
                    for (qx, qy) in x.q_dists.iter().zip(&y.q_dists) {
                        match (qx, qy) {
                            (Some(qx), Some(qy)) => close(qx.values()?, qy.values()?),
                            (None, None) => {}
                            _ => panic!("{at}: q_dists differ"),
                        }
                    }
                }
            }
            if sampling.top_k == 3 {
                assert_eq!(clean, 0, "top-k 3 drops nodes at the first step");
            }
            if sampling.is_greedy() {
                assert_eq!(clean, levels.len(), "greedy trees drop nothing");
            }
        }
        Ok(())
    }

    /// EAGLE-2 trees drafted in one fixed-shape computation (forced here on the CPU: the
    /// frontier chosen by the `frontier` op, the mask's scratch columns from gathered ancestor
    /// rows) equal the level-by-level ones of every step, greedy and sampled, with CFG over
    /// two images, for the default parameters and a small tree whose fed nodes go three deep.
    #[test]
    fn dynamic_drafting_computation_equals_level_by_level_drafting() -> Result<()> {
        let m = c2i_model()?;
        let d = drafter(true)?;
        let cond = Condition::Classes(vec![7, 3]);
        let accept = AcceptConfig::default();
        for (tree, sampling) in [
            ("dynamic", SamplingParams::greedy()),
            ("dynamic:20:3:4", SamplingParams::greedy()),
            ("dynamic:20:3:4", SamplingParams::default()),
        ] {
            let tree = TreeSpec::parse(tree)?;
            let opts = GenerateOptions::new().with_sampling(sampling).with_seed(5);
            let go =
                || generate_speculative(&m, &d, &cond, &opts, &tree, &accept, None).map(|_| ());
            let (levels, fixed, ran, feeds) = levels_then_computation(go)?;
            assert!(levels.len() > 3, "{tree:?}: {} steps", levels.len());
            // every step of the second run drafted in the one computation, most of them after
            // the feed folded in
            assert_eq!(ran, fixed.len(), "{tree:?}");
            assert!(
                feeds * 2 >= fixed.len() && feeds < fixed.len(),
                "{tree:?}: {feeds} folded feeds in {} steps",
                fixed.len()
            );
            assert_eq!(fixed.len(), levels.len(), "{tree:?} {sampling:?}");
            for (i, (a, b)) in fixed.iter().zip(&levels).enumerate() {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert_eq!(
                        (&x.tokens, &x.parents, &x.depths, x.kind),
                        (&y.tokens, &y.parents, &y.depths, y.kind),
                        "{tree:?} {sampling:?}, step {i}"
                    );
                }
            }
            // a tree deeper than its first level (the frontier took part)
            assert!(
                fixed
                    .iter()
                    .flatten()
                    .any(|t| t.depths.iter().any(|&d| d >= 3)),
                "{tree:?}: no node three deep"
            );
        }
        Ok(())
    }

    /// Nodes of a static tree spec.
    fn tree_len(spec: &TreeSpec) -> usize {
        match spec {
            TreeSpec::Static(s) => s.len(),
            TreeSpec::Dynamic(p) => p.total_tokens,
        }
    }

    /// The class-conditional fixture `c2i.pt` with its tiny config.
    fn c2i_model() -> Result<LlamaGen> {
        let cfg = Config {
            dim: 32,
            n_layer: 2,
            n_head: 2,
            n_kv_head: 2,
            vocab_size: 64,
            ffn_hidden: 64,
            num_classes: 10,
            block_size: 16,
            ..Config::gpt_b()
        };
        let path = fixtures().join("c2i.pt");
        Ok(load_llamagen(&path, Some(&cfg), DType::F32, &Device::Cpu)?.0)
    }

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt")
    }

    fn drafter(c2i: bool) -> Result<Drafter> {
        let mut cfg = DrafterConfig::from_hf_json(&fixtures().join("drafter/config.json"))?;
        if c2i {
            cfg.cls_token_num = 0;
            cfg.input_type = "c2i".into();
        }
        let dir = fixtures().join("drafter");
        Ok(load_drafter(&dir, Some(&cfg), DType::F32, &Device::Cpu)?.0)
    }

    fn image(cond: &Condition, g: usize) -> Result<Condition> {
        Ok(match cond {
            Condition::Classes(ids) => Condition::Classes(vec![ids[g]]),
            Condition::Captions { features, mask } => Condition::Captions {
                features: features.i(g..g + 1)?,
                mask: mask.i(g..g + 1)?,
            },
        })
    }

    /// Batches that compact at every step with holes equal their single images (greedy and
    /// sampled, both trees, rows read together or one by one), greedy equals AR, also on the
    /// fixed-shape path (drafting computations forced on the CPU, the feed folded into them
    /// except where a step compacts first). Returns the number of compactions over the
    /// ordinary runs.
    fn check(m: &LlamaGen, d: &Drafter, cond: &Condition, n: usize) -> Result<usize> {
        let (mut total, mut fixed_compactions) = (0, 0);
        let greedy = GenerateOptions::new()
            .with_sampling(SamplingParams::greedy())
            .with_seed(3);
        let sampled = GenerateOptions::new().with_seed(8);
        for tree in ["dynamic", "naive_extend_57"] {
            let tree_spec = TreeSpec::parse(tree)?;
            let accept = AcceptConfig::default();
            let plan = Plan {
                tree_spec: &tree_spec,
                accept: &accept,
                neighbors: None,
                fixed_threshold: Some(1),
                host_block_bytes: HOST_BLOCK_BYTES,
            };
            // every target row read from the device on its own
            let per_row = Plan {
                host_block_bytes: 0,
                ..plan
            };
            for opts in [&greedy, &sampled] {
                // holes are removable only where every image has one (no image always leads)
                let (batch, compactions) = run(m, d, cond, opts, &plan)?;
                total += compactions;
                let (rows, _) = run(m, d, cond, opts, &per_row)?;
                assert_eq!(rows.tokens, batch.tokens, "{tree}: per-row reads");
                for g in 0..n {
                    let one = opts.clone().with_seed(opts.seed + g as u64);
                    let s = generate_speculative(
                        m,
                        d,
                        &image(cond, g)?,
                        &one,
                        &tree_spec,
                        &accept,
                        None,
                    )?;
                    assert_eq!(batch.tokens[g], s.tokens[0], "{tree} image {g}");
                    let (b, s) = (&batch.stats[g], &s.stats[0]);
                    assert_eq!(b.accepted_per_step, s.accepted_per_step, "{tree} {g}");
                }
            }
            let ar = generate_ar(m, cond, &greedy.clone().with_decoding(Decoding::Ar))?;
            assert_eq!(
                run(m, d, cond, &greedy, &plan)?.0.tokens,
                ar.tokens,
                "{tree}"
            );
            // the drafting computations (forced on the CPU), the feed folded into them except
            // where a step compacts first: still greedy AR
            crate::decode::graph_step::force_fixed_shape(true);
            let before = FOLDED_FEEDS.with(|c| c.get());
            let fixed = run(m, d, cond, &greedy, &plan);
            crate::decode::graph_step::force_fixed_shape(false);
            let (fixed, compactions) = fixed?;
            let folded = FOLDED_FEEDS.with(|c| c.get()) - before;
            assert_eq!(fixed.tokens, ar.tokens, "{tree}: fixed-shape path");
            assert!(folded > 0, "{tree}: no folded feed");
            fixed_compactions += compactions;
        }
        assert!(fixed_compactions > 0, "fixed-shape path: no compaction");
        Ok(total)
    }

    #[test]
    fn verify_logits_on_host_and_device_give_the_same_rows() -> Result<()> {
        let t = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        // per image: 3 columns of 4
        let bytes = 12 * std::mem::size_of::<f32>();
        let host = VerifyLogits::new(t.clone(), bytes)?;
        let dev = VerifyLogits::new(t.clone(), bytes - 1)?;
        assert!(matches!(host, VerifyLogits::Host { .. }));
        assert!(matches!(dev, VerifyLogits::Device(_)));
        for g in 0..2 {
            for c in 0..3 {
                let want: Vec<f32> = t.i((g, c))?.to_vec1()?;
                assert_eq!(*host.row(g, c)?, want[..], "host {g} {c}");
                assert_eq!(*dev.row(g, c)?, want[..], "device {g} {c}");
            }
        }
        Ok(())
    }

    #[test]
    fn compacted_batches_equal_single_images() -> Result<()> {
        let m = c2i_model()?;
        let n = check(
            &m,
            &drafter(true)?,
            &Condition::Classes(vec![7, 3, 1, 5]),
            4,
        )?;
        assert!(n > 0, "c2i: no compaction");
        // t2i: caption padding (the second caption has 20 valid rows) must survive compaction
        let m = load_llamagen(&fixtures().join("t2i_hf"), None, DType::F32, &Device::Cpu)?.0;
        let exp =
            candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
        let (f0, v0) = (exp["t2i_features"].i(0..1)?, exp["t2i_valid"].i(0..1)?);
        let mut v1 = vec![0f32; 100];
        v1.extend([1f32; 20]);
        let v1 = Tensor::from_vec(v1, (1, 120), &Device::Cpu)?;
        let f1 = (&f0 * -0.7)?.broadcast_mul(&v1.unsqueeze(2)?)?;
        let cond = Condition::Captions {
            features: Tensor::cat(&[f0.broadcast_mul(&v0.unsqueeze(2)?)?, f1], 0)?,
            mask: Tensor::cat(&[v0, v1], 0)?,
        };
        let n = check(&m, &drafter(false)?, &cond, 2)?;
        assert!(n > 0, "t2i: no compaction");
        Ok(())
    }
}
