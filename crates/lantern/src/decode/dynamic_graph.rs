//! EAGLE-2's dynamic tree ([`super::dynamic`]) drafted in one fixed-shape computation, replayed
//! as one CUDA graph per step on GPUs.
//!
//! Level by level, the dynamic tree costs the host a round trip per level: the picks come back,
//! the host scores them and chooses the next frontier, then uploads its tokens, features, mask
//! and positions. Its structure changes every step, but its sizes do not: every expansion feeds
//! exactly `top_k` frontier nodes per image and asks each for its `top_k` children. So the
//! whole phase can be recorded once, with the choice made on the device: after each level's
//! picks, [`picks::frontier`] scores the candidates (parent score + ln p), keeps the best
//! `top_k` per image in creation order and writes their tokens and where their parents'
//! features are; the next expansion gathers its features and its fed nodes' ancestor rows by
//! that one index (a fed node sees its parent's ancestors and itself), and the mask's scratch
//! columns are those rows. The drafter writes its K/V into a scratch block at the end of its
//! cache, as the static computation ([`super::draft_graph`]) does, with the same per-step
//! inputs. Last, [`picks::select_tree`] chooses every image's tree from all levels' outputs
//! (the host path's choice on the device's scores) and writes what verification needs: the
//! columns' tokens, positions, parents and the tree mask. Verification is queued from those
//! ([`DynamicDrafted`]) before the host reads the trees (one small transfer of the columns).
//!
//! The computation equals the level-by-level path's on the CPU (same ops and arithmetic; the
//! device kernel computes ln p with CUDA's `logf`, so a near tie may be broken differently
//! there). Tests compare the two on the CPU, where the fixed-shape path runs eagerly.
use super::draft_graph::{
    find_or_make, replay_drafting, DraftStep, Drafting, FixedDrafting, StepBuffers,
};
use super::dynamic::tree_of_columns;
use super::graph_step::{Captured, FixedForward};
use super::static_trees::DynamicParams;
use super::tree::DraftTree;
use crate::cache::KvCache;
use crate::fused::picks::{self, DynamicLevels, MAX_PICKS, MAX_SELECT_CANDS};
use crate::sampling::SamplingParams;
use crate::Result;
use candle_core::{DType, Tensor, TensorId};

/// Dynamic drafting computations kept per cache (one per setting met).
pub const MAX_DYNAMIC_GRAPHS: usize = 2;

/// What a dynamic drafting computation was built for.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicKey {
    /// The tree's parameters.
    pub params: DynamicParams,
    /// Images (the cache has `n_img` or `2 n_img` rows).
    pub n_img: usize,
    /// CFG scale, if CFG is on.
    pub cfg: Option<f32>,
    /// Sampling filters of the drafter's rows.
    pub sampling: SamplingParams,
    /// The output head's weight tensor (the computation reads it).
    pub lm_head: TensorId,
    /// Pairs per row of the drafter feed folded into the computation; 0: none (see
    /// [`super::draft_graph::DraftingKey::feed`]).
    pub feed: usize,
}

/// One setting's dynamic drafting computation: its buffers and its graph.
pub struct DynamicDrafting {
    key: DynamicKey,
    /// Its sizes (`k`: `top_k`, at most the vocabulary).
    levels: DynamicLevels,
    bufs: StepBuffers,
    /// `[rows, 1 + fed, fed]` f32 over the fed slots: row 0 (the root) all `-inf`, row 1 + n
    /// fed node n's ancestors and itself (0), else `-inf`.
    anc: Tensor,
    /// Per expansion `[1, k, fed]` f32: 0 at fed node `e k + j` in row j, `-inf` elsewhere.
    selfs: Vec<Tensor>,
    /// `[n_img, 1]` u32: the root's score (0.0) for the first level.
    zero: Tensor,
    /// Every level's [`picks::frontier`] output, flat (u32).
    fronts: Tensor,
    /// `[n_img, 2]` u32 (step input): every image's root token and position.
    roots: Tensor,
    /// The trees' columns ([`picks::select_tree`]'s output).
    columns: Tensor,
    graph: Captured,
}

impl Drafting for DynamicDrafting {
    fn graph_mut(&mut self) -> &mut Captured {
        &mut self.graph
    }
    /// The computation (see the module docs); writes `fronts`, drops every
    /// temporary before it returns (so a captured graph frees what it allocates).
    fn run(
        &self,
        model: &dyn FixedForward,
        lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
        kv: &mut KvCache,
    ) -> Result<()> {
        let (n_img, cfg, sampling) = (self.key.n_img, self.key.cfg, &self.key.sampling);
        let (b, k, depth) = (&self.bufs, self.levels.k, self.levels.depth);
        let (rows, fed, scratch) = (b.rows, b.fed(), b.scratch);
        let probs_of = |h: &Tensor| -> Result<Tensor> {
            Ok(picks::draft_probs_cfg(&lm_head(h)?, n_img, cfg, sampling)?)
        };
        let mut level = probs_of(&b.roots(model, kv)?)?;
        let mut base = self.zero.clone();
        for l in 0..=depth {
            let lay = self.levels.layout(l);
            let block = picks::top_k(&level, k)?;
            let slot_base = (l > 0).then(|| (l - 1) * k);
            let front = picks::frontier(&block, &base, lay, 1 + fed, slot_base)?;
            self.fronts.slice_set(&front, 0, self.levels.level_at(l))?;
            if l == depth {
                break;
            }
            base = front
                .narrow(0, lay.chosen_scores(), n_img * k)?
                .reshape((n_img, k))?;
            let ids = front
                .narrow(0, lay.tokens(), rows * k)?
                .reshape((rows, k))?;
            let at = front.narrow(0, lay.gather(), rows * k)?;
            let feats = b.gather_feats(&at, k)?;
            // the fed nodes' ancestors: their parents' and themselves
            let anc = self
                .anc
                .reshape((rows * (1 + fed), fed))?
                .index_select(&at, 0)?
                .reshape((rows, k, fed))?
                .broadcast_maximum(&self.selfs[l])?;
            self.anc.slice_set(&anc, 1, 1 + l * k)?;
            let mask = Tensor::cat(
                &[
                    &b.prefix
                        .narrow(3, 0, scratch)?
                        .broadcast_as((rows, 1, k, scratch))?,
                    &anc.reshape((rows, 1, k, fed))?,
                ],
                3,
            )?;
            let out = b.expand(model, kv, l, &ids, &feats, &mask)?;
            level = probs_of(&out)?;
        }
        let columns = picks::select_tree(&self.fronts, &self.roots, self.levels)?;
        self.columns.slice_set(&columns, 0, 0)?;
        Ok(())
    }
}

impl DynamicDrafting {
    /// The computation for `key` on a cache of `rows` rows and `max_len` slots, vocabulary
    /// `vocab`; `None` where it does not apply (no expansion, more picks or candidates than the
    /// ops serve, no room for the scratch block).
    fn new(
        key: DynamicKey,
        model: &dyn FixedForward,
        rows: usize,
        max_len: usize,
        vocab: usize,
    ) -> Result<Option<Self>> {
        let p = key.params;
        p.validate()?;
        let k = p.top_k.min(vocab);
        let fed = p.depth * k;
        if p.depth == 0 || k == 0 || k > MAX_PICKS || fed >= max_len {
            return Ok(None);
        }
        let dev = model.fixed_device().clone();
        let offsets: Vec<usize> = (0..=p.depth).map(|e| e * k).collect();
        let mut selfs = Vec::with_capacity(p.depth);
        for e in 0..p.depth {
            let mut m = vec![f32::NEG_INFINITY; k * fed];
            for j in 0..k {
                m[j * fed + e * k + j] = 0.0;
            }
            selfs.push(Tensor::from_vec(m, (1, k, fed), &dev)?);
        }
        let levels = DynamicLevels {
            n_img: key.n_img,
            k,
            depth: p.depth,
            rows,
            total: p.total_tokens,
        };
        if levels.cands() > MAX_SELECT_CANDS {
            return Ok(None);
        }
        let n = levels.cols();
        let Some(bufs) = StepBuffers::new(model, rows, max_len, offsets, key.feed)? else {
            return Ok(None);
        };
        Ok(Some(Self {
            levels,
            bufs,
            anc: Tensor::full(f32::NEG_INFINITY, (rows, 1 + fed, fed), &dev)?,
            selfs,
            zero: Tensor::zeros((key.n_img, 1), DType::U32, &dev)?,
            fronts: Tensor::zeros(levels.len(), DType::U32, &dev)?,
            roots: Tensor::zeros((key.n_img, 2), DType::U32, &dev)?,
            columns: Tensor::zeros((key.n_img, 3 + n, n), DType::F32, &dev)?,
            graph: Default::default(),
            key,
        }))
    }
}

/// Drafts every image's EAGLE-2 tree in one fixed-shape computation (captured on the first call
/// of its setting, replayed after) on the drafter of `fx` and `lm_head` (the target's output
/// head, whose weights `key.lm_head` names) and chooses the trees on the device. `None` where
/// it does not apply (see [`DynamicDrafting::new`]; no room before the scratch block): then
/// draft level by level.
pub fn draft_dynamic_fixed(
    fx: FixedDrafting,
    lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
    key: DynamicKey,
    step: &DraftStep,
) -> Result<Option<DynamicDrafted>> {
    let FixedDrafting {
        model,
        kv,
        dynamic: graphs,
        capture,
        rope_rows,
        zero_row,
        ..
    } = fx;
    let made = find_or_make(
        graphs,
        |g| g.key == key,
        MAX_DYNAMIC_GRAPHS,
        || {
            let (rows, max_len) = (kv.batch(), kv.max_len());
            DynamicDrafting::new(key.clone(), model, rows, max_len, step.vocab)
        },
    )?;
    let Some(g) = made else {
        return Ok(None);
    };
    if !g.bufs.fits(kv, step, key.n_img)? {
        return Ok(None);
    }
    g.bufs
        .write(key.n_img, step, kv.len(), (rope_rows, zero_row))?;
    let roots: Vec<u32> = step
        .root_tokens
        .iter()
        .zip(step.roots)
        .flat_map(|(&t, &at)| [t, at as u32])
        .collect();
    g.roots.slice_set(
        &Tensor::from_vec(roots, (key.n_img, 2), g.roots.device())?,
        0,
        0,
    )?;
    let label = format!("dynamic drafting of {} tokens", key.params.total_tokens);
    replay_drafting(g, model, kv, capture, lm_head, &label)?;
    g.bufs.commit_feed(kv, step)?;
    Ok(Some(DynamicDrafted {
        columns: g.columns.clone(),
    }))
}

/// Dynamic trees drafted and chosen on the device ([`draft_dynamic_fixed`]): what verification
/// needs is there already; the trees are read when acceptance needs them
/// ([`DynamicDrafted::trees`]), so that verification can be queued before the host waits. Valid
/// until the next step's drafting (the computation's buffer).
pub struct DynamicDrafted {
    /// [`picks::select_tree`]'s output `[n_img, 3 + n, n]` f32.
    columns: Tensor,
}

impl DynamicDrafted {
    /// Verification ids `[n_img, n]` u32 (column i = tree node i, the root first).
    pub fn ids(&self) -> Result<Tensor> {
        Ok(self.row(0)?.to_dtype(DType::U32)?)
    }

    /// Every column's position `[n_img, n]` u32 (the root's + depth).
    pub fn positions(&self) -> Result<Tensor> {
        Ok(self.row(1)?.to_dtype(DType::U32)?)
    }

    /// The additive tree masks `[n_img, n, n]` f32 (a node sees its ancestors and itself).
    pub fn tree_mask(&self) -> Result<Tensor> {
        let n = self.columns.dim(2)?;
        Ok(self.columns.narrow(1, 3, n)?)
    }

    fn row(&self, r: usize) -> Result<Tensor> {
        Ok(self.columns.narrow(1, r, 1)?.squeeze(1)?)
    }

    /// Every image's tree (one transfer of the columns' tokens and parents).
    pub fn trees(&self) -> Result<Vec<DraftTree>> {
        let cols: Vec<Vec<Vec<f32>>> = self.columns.narrow(1, 0, 3)?.to_vec3()?;
        cols.iter()
            .map(|c| {
                let tokens: Vec<u32> = c[0].iter().map(|&x| x as u32).collect();
                let parents: Vec<Option<usize>> = c[2]
                    .iter()
                    .map(|&p| (p >= 0.0).then_some(p as usize))
                    .collect();
                tree_of_columns(&tokens, &parents)
            })
            .collect()
    }
}
