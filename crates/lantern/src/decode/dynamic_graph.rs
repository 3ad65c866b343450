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
//! inputs. After the replay the host reads every level's frontier output (candidate tokens,
//! scores, the kept ones) in one transfer and assembles the trees from the device's scores
//! exactly as the host path does.
//!
//! The computation equals the level-by-level path's on the CPU (same ops and arithmetic; the
//! device kernel computes ln p with CUDA's `logf`, so a near tie may be broken differently
//! there). Tests compare the two on the CPU, where the fixed-shape path runs eagerly.
use super::draft_graph::{
    find_or_make, replay_drafting, DraftStep, Drafting, FixedDrafting, StepBuffers,
};
use super::dynamic::{assemble, Cand};
use super::graph_step::{Captured, FixedForward};
use super::static_trees::DynamicParams;
use super::tree::DraftTree;
use crate::cache::KvCache;
use crate::fused::picks::{self, FrontierLayout, MAX_PICKS};
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
}

/// One setting's dynamic drafting computation: its buffers and its graph.
pub struct DynamicDrafting {
    key: DynamicKey,
    /// Children per node and frontier width (`top_k`, at most the vocabulary).
    k: usize,
    bufs: StepBuffers,
    /// `[rows, 1 + fed, fed]` f32 over the fed slots: row 0 (the root) all `-inf`, row 1 + n
    /// fed node n's ancestors and itself (0), else `-inf`.
    anc: Tensor,
    /// Per expansion `[1, k, fed]` f32: 0 at fed node `e k + j` in row j, `-inf` elsewhere.
    selfs: Vec<Tensor>,
    /// `[n_img, 1]` u32: the root's score (0.0) for the first level.
    zero: Tensor,
    /// Every level's [`picks::frontier`] output, flat (u32): what the host reads.
    fronts: Tensor,
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
        let (b, k, depth) = (&self.bufs, self.k, self.key.params.depth);
        let (rows, fed, scratch) = (b.rows, b.fed(), b.scratch);
        let probs_of = |h: &Tensor| -> Result<Tensor> {
            Ok(picks::draft_probs_cfg(&lm_head(h)?, n_img, cfg, sampling)?)
        };
        let mut level = probs_of(&b.root_feat()?)?;
        let mut base = self.zero.clone();
        for l in 0..=depth {
            let lay = self.layout(l);
            let block = picks::top_k(&level, k)?;
            let slot_base = (l > 0).then(|| (l - 1) * k);
            let front = picks::frontier(&block, &base, lay, 1 + fed, slot_base)?;
            self.fronts.slice_set(&front, 0, self.level_at(l))?;
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
        Ok(())
    }
}

impl DynamicDrafting {
    /// Level `l`'s frontier layout.
    fn layout(&self, l: usize) -> FrontierLayout {
        level_layout(self.key.n_img, self.k, self.bufs.rows, l)
    }

    /// Start of level `l`'s frontier output in `fronts`.
    fn level_at(&self, l: usize) -> usize {
        (0..l).map(|i| self.layout(i).len()).sum()
    }

    /// The computation for `key` on a cache of `rows` rows and `max_len` slots, vocabulary
    /// `vocab`; `None` where it does not apply (no expansion, more picks than the ops serve,
    /// no room for the scratch block).
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
        let n_fronts: usize = (0..=p.depth)
            .map(|l| level_layout(key.n_img, k, rows, l).len())
            .sum();
        Ok(Some(Self {
            k,
            bufs: StepBuffers::new(model, rows, max_len, offsets)?,
            anc: Tensor::full(f32::NEG_INFINITY, (rows, 1 + fed, fed), &dev)?,
            selfs,
            zero: Tensor::zeros((key.n_img, 1), DType::U32, &dev)?,
            fronts: Tensor::zeros(n_fronts, DType::U32, &dev)?,
            graph: Default::default(),
            key,
        }))
    }

    /// Every image's tree from one transfer of the frontier outputs: the candidates of
    /// [`super::dynamic::draft_dynamic`] with the device's tokens, scores and frontiers.
    fn trees(&self, root_tokens: &[u32]) -> Result<Vec<DraftTree>> {
        let (n_img, k) = (self.key.n_img, self.k);
        let fronts: Vec<u32> = self.fronts.to_vec1()?;
        let mut trees = Vec::with_capacity(n_img);
        for (g, &root) in root_tokens.iter().enumerate() {
            let mut cands: Vec<Cand> = Vec::new();
            // candidate index of each frontier node (the root level: none)
            let mut frontier: Vec<Option<usize>> = vec![None];
            for l in 0..=self.key.params.depth {
                let lay = self.layout(l);
                let at = self.level_at(l);
                let (nc, start) = (lay.cands(), cands.len());
                let front = &fronts[at..at + lay.len()];
                for c in 0..nc {
                    cands.push(Cand {
                        token: front[lay.cand_tokens() + g * nc + c],
                        score: f32::from_bits(front[lay.scores() + g * nc + c]),
                        parent: frontier[c / k],
                    });
                }
                frontier = front[lay.chosen() + g * k..lay.chosen() + (g + 1) * k]
                    .iter()
                    .map(|&c| Some(start + c as usize))
                    .collect();
            }
            trees.push(assemble(&cands, root, self.key.params.total_tokens)?);
        }
        Ok(trees)
    }
}

/// Level `l`'s frontier layout for `n_img` images, `k` picks and kept nodes, `rows` drafter
/// rows (level 0 follows the root: one row per image).
fn level_layout(n_img: usize, k: usize, rows: usize, l: usize) -> FrontierLayout {
    FrontierLayout {
        n_img,
        rows_per_img: if l == 0 { 1 } else { k },
        k,
        keep: k,
        rows,
    }
}

/// Drafts every image's EAGLE-2 tree in one fixed-shape computation (captured on the first call
/// of its setting, replayed after) on the drafter of `fx` and `lm_head` (the target's output
/// head, whose weights `key.lm_head` names), and reads the trees. `None` where it does not
/// apply (see [`DynamicDrafting::new`]; no room before the scratch block): then draft level
/// by level.
pub fn draft_dynamic_fixed(
    fx: FixedDrafting,
    lm_head: &dyn Fn(&Tensor) -> Result<Tensor>,
    key: DynamicKey,
    step: &DraftStep,
) -> Result<Option<Vec<DraftTree>>> {
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
    let label = format!("dynamic drafting of {} tokens", key.params.total_tokens);
    replay_drafting(g, model, kv, capture, lm_head, &label)?;
    g.trees(step.root_tokens).map(Some)
}
