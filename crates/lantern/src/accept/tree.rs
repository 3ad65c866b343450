//! Tree acceptance driver: walks a verified [`DraftTree`] from the root, testing the children
//! of the current node in sibling order with the configured rule, and reports the accepted
//! path, the bonus token and the exact per-position distortion (TVD).
use super::proximity::Neighbors;
use super::rules::{
    absorb_within, accept_prob_deterministic, accept_prob_sampled, greedy_accepts, normalize,
    residual_deterministic, residual_sampled, tvd, Relaxation, Residual,
};
use crate::decode::tree::{DraftKind, DraftTree};
use crate::sampling::{argmax, sample_index};
use crate::{Error, Result};
use rand::Rng;

/// Source of target probability rows, fetched lazily so that only the rows the walk needs are
/// copied off the device.
pub trait TargetRows {
    /// Target probabilities (after CFG and the sampling filters) for the position after tree
    /// node `node`. For greedy decoding pass `softmax` of the CFG logits (not a point mass),
    /// otherwise LANTERN has no neighbour mass to absorb.
    fn row(&mut self, node: usize) -> Result<Vec<f32>>;
}

impl TargetRows for Vec<Vec<f32>> {
    fn row(&mut self, node: usize) -> Result<Vec<f32>> {
        self.get(node)
            .cloned()
            .ok_or_else(|| Error::invalid("target rows", format!("no row for tree node {node}")))
    }
}

/// Acceptance settings of a speculative step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptConfig {
    /// Exact, LANTERN or LANTERN++.
    pub relaxation: Relaxation,
    /// Residual after a rejection.
    pub residual: Residual,
    /// Greedy (temperature 0) decisions: deterministic, no random draws.
    pub greedy: bool,
}

impl Default for AcceptConfig {
    /// Exact acceptance, standard residual, sampling.
    fn default() -> Self {
        Self {
            relaxation: Relaxation::Exact,
            residual: Residual::Standard,
            greedy: false,
        }
    }
}

/// Outcome of verifying one draft tree.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeDecision {
    /// Accepted tree nodes (root excluded), root to leaf.
    pub accepted: Vec<usize>,
    /// Bonus token: sampled from `p` at the last accepted node, or from the residual after the
    /// last rejection (greedy: argmax of the unmodified `p`).
    pub next_token: u32,
    /// One entry per emitted position (`accepted.len() + 1`). Sampling: TVD between the
    /// distribution the position was sampled from (given the drafts) and the one the exact rule
    /// would have used with the same drafts; for deterministic drafts the latter is `p`, so this
    /// is exactly TVD(effective, p), and for sampled drafts its mean upper-bounds the marginal
    /// TVD. Greedy: the mass absorbed by the accepted relaxed draft (0 for the bonus).
    pub tvd: Vec<f32>,
}

/// Running mean and maximum of per-position TVDs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TvdStats {
    /// Number of positions seen.
    pub count: u64,
    /// Sum of the TVDs.
    pub sum: f64,
    /// Largest TVD.
    pub max: f32,
}

impl TvdStats {
    /// Adds the positions of one decision.
    pub fn push(&mut self, tvds: &[f32]) {
        for &t in tvds {
            self.count += 1;
            self.sum += t as f64;
            self.max = self.max.max(t);
        }
    }

    /// Mean TVD per position (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// The sibling chain at one node: acceptance probability of every child the walk can reach,
/// the residual left when all are rejected, and the effective distribution of the position.
#[derive(Debug, Clone)]
pub struct SiblingChain {
    /// Acceptance probability of each child in sibling order (shorter than the child list when
    /// a child is accepted with certainty: later ones are never tried).
    pub accept: Vec<f32>,
    /// Mass absorbed by each tested child.
    pub absorbed: Vec<f32>,
    /// Distribution sampled from when every child is rejected.
    pub residual: Vec<f32>,
    /// Exact distribution of the token emitted at this position, given the drafts.
    pub effective: Vec<f32>,
}

/// Computes the [`SiblingChain`] of `node` against its target row `p`.
///
/// With [`Residual::Standard`], deterministic drafts and LANTERN, the budget of sibling `j` is
/// `(delta - spent) / W`, where `W` is the probability of reaching it and `spent` the mass
/// already moved by earlier siblings (weighted by their reach): by the triangle inequality the
/// effective distribution then stays within `delta` of `p` however many siblings are tried.
/// The official rule gives every sibling the full `delta` on the current residual.
///
/// Sampled drafts ([`DraftKind::WithoutReplacement`]) keep no `delta` guarantee: every code the
/// drafter could propose tests against its own relaxed target, so the marginal distortion can
/// reach 1 (drafter uniform on codes of zero target mass, each with one neighbour of mass
/// `delta`). LANTERN++ keeps `marginal effective <= lambda * p` pointwise; use it there.
pub fn sibling_chain(
    tree: &DraftTree,
    node: usize,
    p: &[f32],
    cfg: &AcceptConfig,
    neighbors: Option<&Neighbors>,
) -> Result<SiblingChain> {
    let v = p.len();
    let children = tree.children(node);
    let k = cfg.relaxation.k();
    let sampled = tree.kind == DraftKind::WithoutReplacement;
    let mut q_cur = if sampled {
        let qd = tree
            .q_dists
            .get(node)
            .and_then(|q| q.as_ref())
            .ok_or_else(|| {
                Error::invalid(
                    "draft tree",
                    format!(
                        "node {node} has sampled children but no drafter distribution (q_dists)"
                    ),
                )
            })?;
        let qd = qd.values()?;
        if qd.len() != v {
            return Err(Error::invalid(
                "draft tree",
                format!(
                    "drafter distribution of node {node} has {} entries, target rows {v}",
                    qd.len()
                ),
            ));
        }
        let mut q = qd.to_vec();
        normalize(&mut q);
        q
    } else {
        Vec::new()
    };
    let mut r = p.to_vec();
    let (mut reach, mut spent) = (1.0f64, 0.0f64);
    let mut accept = Vec::with_capacity(children.len());
    let mut absorbed = Vec::with_capacity(children.len());
    let mut effective = vec![0.0f64; v];
    for &c in &children {
        let x = tree.tokens[c];
        if x as usize >= v {
            return Err(Error::invalid(
                "draft tree",
                format!("node {c} drafts token {x}, vocabulary has {v} codes"),
            ));
        }
        let rx = r[x as usize];
        let budget = match cfg.relaxation {
            Relaxation::Lantern { delta, .. } if !sampled && cfg.residual == Residual::Standard => {
                (((delta as f64 - spent) / reach).max(0.0)) as f32
            }
            rel => rel.budget(rx),
        };
        let (abs, len) = match neighbors {
            Some(nb) => absorb_within(&r, x, nb, k, budget),
            None => (0.0, 0),
        };
        let a = if sampled {
            accept_prob_sampled(rx, abs, tree.q.get(c).copied().unwrap_or(0.0))
        } else {
            accept_prob_deterministic(rx, abs)
        };
        accept.push(a);
        absorbed.push(abs);
        spent += reach * abs as f64;
        effective[x as usize] += reach * a as f64;
        reach *= 1.0 - a as f64;
        if reach <= 0.0 {
            break;
        }
        if sampled {
            residual_sampled(&mut r, &q_cur, x, len, k, neighbors, cfg.residual);
            q_cur[x as usize] = 0.0;
            normalize(&mut q_cur);
        } else {
            residual_deterministic(&mut r, x, len, k, neighbors, cfg.residual);
        }
    }
    if reach > 0.0 {
        for (e, &ri) in effective.iter_mut().zip(&r) {
            *e += reach * ri as f64;
        }
    }
    Ok(SiblingChain {
        accept,
        absorbed,
        residual: r,
        effective: effective.into_iter().map(|e| e as f32).collect(),
    })
}

fn check_inputs(
    tree: &DraftTree,
    cfg: &AcceptConfig,
    neighbors: Option<&Neighbors>,
    v: usize,
) -> Result<()> {
    if tree.is_empty() || tree.parents.len() != tree.len() || tree.q.len() != tree.len() {
        return Err(Error::invalid(
            "draft tree",
            "tokens, parents and q must have one entry per node, root included",
        ));
    }
    if (1..tree.len()).any(|i| tree.parents[i] >= i) {
        return Err(Error::invalid(
            "draft tree",
            "every node's parent must precede it",
        ));
    }
    cfg.relaxation.validate(v)?;
    if !cfg.relaxation.is_exact() {
        let nb = neighbors.ok_or_else(|| {
            Error::invalid("acceptance", "LANTERN acceptance needs a neighbour table (pass one or build it with `lantern neighbors --vq ...`)")
        })?;
        nb.check_codebook(v, None)?;
        if cfg.relaxation.k() > nb.k_max() {
            return Err(Error::invalid(
                "LANTERN k",
                format!(
                    "{} but the neighbour table holds {} per code (lower k or rebuild the table)",
                    cfg.relaxation.k(),
                    nb.k_max()
                ),
            ));
        }
    }
    Ok(())
}

/// Verifies `tree` against the target rows and decides the accepted path and the bonus token.
///
/// Sampling: one uniform draw per tried child, then one draw for the bonus token. Greedy: no
/// draws; the longest accepted path wins (first in sibling order on ties), as the official
/// release picks the first path of maximal accepted length.
pub fn accept_tree(
    tree: &DraftTree,
    rows: &mut dyn TargetRows,
    cfg: &AcceptConfig,
    neighbors: Option<&Neighbors>,
    rng: &mut dyn rand::RngCore,
) -> Result<TreeDecision> {
    let p0 = rows.row(0)?;
    let v = p0.len();
    check_inputs(tree, cfg, neighbors, v)?;
    if cfg.greedy {
        return accept_greedy(tree, rows, cfg, neighbors, p0);
    }
    let mut node = 0;
    let mut p = p0;
    let mut accepted = Vec::new();
    let mut tvds = Vec::new();
    let exact_cfg = AcceptConfig {
        relaxation: Relaxation::Exact,
        residual: Residual::Standard,
        greedy: false,
    };
    loop {
        if p.len() != v {
            return Err(Error::invalid(
                "target rows",
                format!("row of node {node} has {} entries, root row {v}", p.len()),
            ));
        }
        let children = tree.children(node);
        if children.is_empty() {
            tvds.push(0.0);
            let next = sample_index(&p, rng) as u32;
            return Ok(TreeDecision {
                accepted,
                next_token: next,
                tvd: tvds,
            });
        }
        let chain = sibling_chain(tree, node, &p, cfg, neighbors)?;
        let distortion = match tree.kind {
            DraftKind::Deterministic => tvd(&chain.effective, &p),
            DraftKind::WithoutReplacement if cfg.relaxation.is_exact() => 0.0,
            DraftKind::WithoutReplacement => {
                let exact = sibling_chain(tree, node, &p, &exact_cfg, None)?;
                tvd(&chain.effective, &exact.effective)
            }
        };
        tvds.push(distortion);
        let mut hit = None;
        for (&c, &a) in children.iter().zip(&chain.accept) {
            if rng.random::<f32>() < a {
                hit = Some(c);
                break;
            }
        }
        match hit {
            Some(c) => {
                accepted.push(c);
                node = c;
                p = rows.row(c)?;
            }
            None => {
                let next = sample_index(&chain.residual, rng) as u32;
                return Ok(TreeDecision {
                    accepted,
                    next_token: next,
                    tvd: tvds,
                });
            }
        }
    }
}

/// Greedy DFS: returns (path, absorbed per path node, bonus token).
fn greedy_dfs(
    tree: &DraftTree,
    node: usize,
    p: Vec<f32>,
    rows: &mut dyn TargetRows,
    cfg: &AcceptConfig,
    neighbors: Option<&Neighbors>,
) -> Result<(Vec<usize>, Vec<f32>, u32)> {
    let mut best: (Vec<usize>, Vec<f32>, u32) = (Vec::new(), Vec::new(), argmax(&p) as u32);
    for c in tree.children(node) {
        let x = tree.tokens[c];
        if x as usize >= p.len() {
            return Err(Error::invalid(
                "draft tree",
                format!(
                    "node {c} drafts token {x}, vocabulary has {} codes",
                    p.len()
                ),
            ));
        }
        let abs = match neighbors {
            Some(nb) if !cfg.relaxation.is_exact() => {
                absorb_within(
                    &p,
                    x,
                    nb,
                    cfg.relaxation.k(),
                    cfg.relaxation.budget(p[x as usize]),
                )
                .0
            }
            _ => 0.0,
        };
        if !greedy_accepts(&p, x, abs) {
            continue;
        }
        let pc = rows.row(c)?;
        if pc.len() != p.len() {
            return Err(Error::invalid(
                "target rows",
                format!(
                    "row of node {c} has {} entries, root row {}",
                    pc.len(),
                    p.len()
                ),
            ));
        }
        let (mut path, mut absd, next) = greedy_dfs(tree, c, pc, rows, cfg, neighbors)?;
        if path.len() + 1 > best.0.len() {
            path.insert(0, c);
            absd.insert(0, abs);
            best = (path, absd, next);
        }
    }
    Ok(best)
}

fn accept_greedy(
    tree: &DraftTree,
    rows: &mut dyn TargetRows,
    cfg: &AcceptConfig,
    neighbors: Option<&Neighbors>,
    p0: Vec<f32>,
) -> Result<TreeDecision> {
    let (accepted, mut tvd, next_token) = greedy_dfs(tree, 0, p0, rows, cfg, neighbors)?;
    tvd.push(0.0);
    Ok(TreeDecision {
        accepted,
        next_token,
        tvd,
    })
}
