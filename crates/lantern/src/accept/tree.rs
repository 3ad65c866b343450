//! Tree acceptance driver: walks a verified [`DraftTree`] from the root, testing the children
//! of the current node in sibling order with the configured rule, and reports the accepted
//! path, the bonus token and the exact per-position distortion (TVD).
use super::proximity::Neighbors;
use super::rules::{
    absorb_within, accept_prob_deterministic, accept_prob_sampled, greedy_accepts, normalize,
    residual_deterministic, residual_sampled, tvd, Relaxation, Residual,
};
use super::walk::{drafter_row, SampledWalk};
use crate::decode::tree::{DraftKind, DraftTree};
use crate::sampling::{argmax, row_total, sample_index, sample_index_total};
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
    if tree.kind == DraftKind::WithoutReplacement && cfg.residual == Residual::Standard {
        let children = tree.children(node);
        let w = SampledWalk::run(tree, node, &children, p, cfg, neighbors, false)?;
        let (residual, effective) = (w.residual().to_vec(), w.effective(&w.lane));
        return Ok(SiblingChain {
            accept: w.lane.accept,
            absorbed: w.lane.absorbed,
            residual,
            effective,
        });
    }
    chain_one_rule(tree, node, p, cfg, neighbors)
}

/// [`sibling_chain`] one rule function at a time (a pass per residual and per normalisation):
/// deterministic drafts and the official residual run it, and the tests hold the shared
/// sampled walk to it bit for bit.
fn chain_one_rule(
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
        let mut q = drafter_row(tree, node, v)?.to_vec();
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
        // the standard residual of sampled drafts: one shared walk for the rule and the exact
        // chain of the distortion statistic; otherwise the chains one by one
        let (walk, chain);
        let (accept, residual, total): (&[f32], &[f32], _) =
            if tree.kind == DraftKind::WithoutReplacement && cfg.residual == Residual::Standard {
                walk = SampledWalk::run(tree, node, &children, &p, cfg, neighbors, true)?;
                tvds.push(walk.distortion);
                (&walk.lane.accept, walk.residual(), walk.total)
            } else {
                chain = sibling_chain(tree, node, &p, cfg, neighbors)?;
                let distortion = match tree.kind {
                    DraftKind::Deterministic => tvd(&chain.effective, &p),
                    DraftKind::WithoutReplacement if cfg.relaxation.is_exact() => 0.0,
                    DraftKind::WithoutReplacement => {
                        let exact = sibling_chain(tree, node, &p, &exact_cfg, None)?;
                        tvd(&chain.effective, &exact.effective)
                    }
                };
                tvds.push(distortion);
                (&chain.accept, &chain.residual, None)
            };
        let mut hit = None;
        for (&c, &a) in children.iter().zip(accept) {
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
                let total = total.unwrap_or_else(|| row_total(residual));
                let next = sample_index_total(residual, total, rng) as u32;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::Metric;
    use crate::decode::static_trees::TreeShape;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// `accept_tree` for sampled drafts as it was written before the shared walk.
    fn reference_accept(
        tree: &DraftTree,
        rows: &mut dyn TargetRows,
        cfg: &AcceptConfig,
        neighbors: Option<&Neighbors>,
        rng: &mut dyn rand::RngCore,
    ) -> Result<TreeDecision> {
        let exact_cfg = AcceptConfig::default();
        let (mut node, mut accepted, mut tvds) = (0, Vec::new(), Vec::new());
        loop {
            let p = &rows.row(node)?;
            let children = tree.children(node);
            if children.is_empty() {
                tvds.push(0.0);
                let next_token = sample_index(p, rng) as u32;
                return Ok(TreeDecision {
                    accepted,
                    next_token,
                    tvd: tvds,
                });
            }
            let chain = chain_one_rule(tree, node, p, cfg, neighbors)?;
            tvds.push(if cfg.relaxation.is_exact() {
                0.0
            } else {
                let exact = chain_one_rule(tree, node, p, &exact_cfg, None)?;
                tvd(&chain.effective, &exact.effective)
            });
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
                }
                None => {
                    let next_token = sample_index(&chain.residual, rng) as u32;
                    return Ok(TreeDecision {
                        accepted,
                        next_token,
                        tvd: tvds,
                    });
                }
            }
        }
    }

    /// Softmax of `scale * N(0, 1)`-ish logits over `v` codes; with `zeros`, about that
    /// fraction of codes get probability 0 (a filtered row).
    fn random_row(rng: &mut StdRng, v: usize, scale: f32, zeros: f64) -> Vec<f32> {
        let l: Vec<f32> = (0..v)
            .map(|_| scale * (rng.random::<f32>() + rng.random::<f32>() - 1.0) * 2.45)
            .collect();
        let m = l.iter().copied().fold(f32::MIN, f32::max);
        let mut e: Vec<f32> = l
            .iter()
            .map(|x| {
                if rng.random::<f64>() < zeros {
                    0.0
                } else {
                    (x - m).exp()
                }
            })
            .collect();
        if e.iter().all(|&x| x == 0.0) {
            e[0] = 1.0;
        }
        let s: f32 = e.iter().sum();
        e.iter_mut().for_each(|x| *x /= s);
        e
    }

    /// A sampled tree of the given shape: each internal node's children drawn without
    /// replacement from its own random drafter row, with their conditional probabilities.
    fn sampled_tree(rng: &mut StdRng, shape: &TreeShape, v: usize, zeros: f64) -> DraftTree {
        let n = shape.len();
        let mut tree = DraftTree {
            tokens: vec![0; n],
            parents: shape.parents.clone(),
            depths: shape.depths.clone(),
            q: vec![1.0; n],
            q_dists: vec![None; n],
            kind: DraftKind::WithoutReplacement,
        };
        for node in 0..n {
            let children = shape.children(node);
            if children.is_empty() {
                continue;
            }
            let qd = random_row(rng, v, 2.0, zeros);
            let mut left = qd.clone();
            for c in children {
                let s: f32 = left.iter().sum();
                let x = sample_index(&left, rng);
                tree.tokens[c] = x as u32;
                tree.q[c] = left[x] / s;
                left[x] = 0.0;
            }
            tree.q_dists[node] = Some(qd.into());
        }
        tree
    }

    /// Target rows: random, with every root child made unlikely (`reject`) or the first child
    /// of every node made certain (`accept`).
    fn rows_for(rng: &mut StdRng, tree: &DraftTree, v: usize, mode: u8) -> Vec<Vec<f32>> {
        (0..tree.len())
            .map(|node| {
                let mut p = random_row(rng, v, 2.0, 0.0);
                let children = tree.children(node);
                match mode {
                    1 if node == 0 => {
                        for &c in &children {
                            p[tree.tokens[c] as usize] *= 1e-4;
                        }
                    }
                    2 => {
                        if let Some(&c) = children.first() {
                            p[tree.tokens[c] as usize] += 1.0;
                        }
                    }
                    _ => {}
                }
                normalize(&mut p);
                p
            })
            .collect()
    }

    fn configs() -> Vec<AcceptConfig> {
        let mut out = Vec::new();
        for relaxation in [
            Relaxation::Exact,
            Relaxation::LanternPP {
                k: 100,
                lambda: 2.0,
            },
            Relaxation::LanternPP { k: 7, lambda: 20.0 },
            Relaxation::Lantern { k: 50, delta: 0.3 },
        ] {
            out.push(AcceptConfig {
                relaxation,
                residual: Residual::Standard,
                greedy: false,
            });
        }
        out
    }

    /// Rows copied out of a borrowed block, one copy per read (as the decoder's host block).
    struct Borrowed<'a>(&'a [Vec<f32>]);

    impl TargetRows for Borrowed<'_> {
        fn row(&mut self, node: usize) -> Result<Vec<f32>> {
            Ok(self.0[node].clone())
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn shared_walk_reproduces_the_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        let shape = TreeShape::preset("naive_extend_57").unwrap();
        for (case, v) in [16_384usize, 1_003, 258, 37]
            .into_iter()
            .cycle()
            .take(24)
            .enumerate()
        {
            let cb: Vec<f32> = (0..v * 4).map(|_| rng.random::<f32>()).collect();
            let nb = Neighbors::build(&cb, v, 4, 100.min(v - 1), Metric::L2).unwrap();
            let zeros = [0.0, 0.5, 0.99][case % 3];
            let tree = sampled_tree(&mut rng, &shape, v, zeros);
            let mut rows = rows_for(&mut rng, &tree, v, (case % 3) as u8);
            if case % 4 == 3 {
                // p == q at the root: nothing left after the first residual
                rows[0] = tree.q_dists[0].as_ref().unwrap().values().unwrap().to_vec();
                normalize(&mut rows[0]);
            }
            for mut cfg in configs() {
                if let Relaxation::LanternPP { k, .. } | Relaxation::Lantern { k, .. } =
                    &mut cfg.relaxation
                {
                    *k = (*k).min(v - 2);
                }
                for node in (0..tree.len()).filter(|&n| !tree.children(n).is_empty()) {
                    let got = sibling_chain(&tree, node, &rows[node], &cfg, Some(&nb)).unwrap();
                    let want = chain_one_rule(&tree, node, &rows[node], &cfg, Some(&nb)).unwrap();
                    let at = format!("case {case} v {v} {cfg:?} node {node}");
                    assert_eq!(bits(&got.accept), bits(&want.accept), "{at}");
                    assert_eq!(bits(&got.absorbed), bits(&want.absorbed), "{at}");
                    assert_eq!(bits(&got.residual), bits(&want.residual), "{at}");
                    assert_eq!(bits(&got.effective), bits(&want.effective), "{at}");
                }
                for seed in 0..8 {
                    let (mut r1, mut r2) =
                        (StdRng::seed_from_u64(seed), StdRng::seed_from_u64(seed));
                    let got = accept_tree(&tree, &mut rows.clone(), &cfg, Some(&nb), &mut r1);
                    let want =
                        reference_accept(&tree, &mut Borrowed(&rows), &cfg, Some(&nb), &mut r2);
                    let (got, want) = (got.unwrap(), want.unwrap());
                    let at = format!("case {case} v {v} {cfg:?} seed {seed}");
                    assert_eq!(got.accepted, want.accepted, "{at}");
                    assert_eq!(got.next_token, want.next_token, "{at}");
                    assert_eq!(bits(&got.tvd), bits(&want.tvd), "{at}");
                    assert_eq!(r1.random::<u64>(), r2.random::<u64>(), "{at}: draws");
                }
            }
        }
    }

    /// Host time of `accept_tree` at LlamaGen's vocabulary on the `naive_extend_57` tree with
    /// sampled drafts: every root child rejected, or a full path accepted (`--ignored
    /// --nocapture`).
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn accept_time_16k() {
        use std::time::Instant;
        let v = 16_384;
        let mut rng = StdRng::seed_from_u64(5);
        let cb: Vec<f32> = (0..v * 8).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let nb = Neighbors::build(&cb, v, 8, 100, Metric::L2).unwrap();
        let shape = TreeShape::preset("naive_extend_57").unwrap();
        let tree = sampled_tree(&mut rng, &shape, v, 0.0);
        for (case, mode) in [("all root children rejected", 1u8), ("path accepted", 2)] {
            let rows = rows_for(&mut rng, &tree, v, mode);
            for (name, relaxation) in [
                ("exact", Relaxation::Exact),
                (
                    "lantern++ k100 lambda2",
                    Relaxation::LanternPP {
                        k: 100,
                        lambda: 2.0,
                    },
                ),
            ] {
                let cfg = AcceptConfig {
                    relaxation,
                    ..AcceptConfig::default()
                };
                let n = 400;
                type Accept = fn(
                    &DraftTree,
                    &mut dyn TargetRows,
                    &AcceptConfig,
                    Option<&Neighbors>,
                    &mut dyn rand::RngCore,
                ) -> Result<TreeDecision>;
                let mut us = [0.0; 2];
                let mut len = 0;
                for (t_us, f) in us.iter_mut().zip([reference_accept as Accept, accept_tree]) {
                    let mut r = StdRng::seed_from_u64(1);
                    len = 0;
                    let t = Instant::now();
                    for _ in 0..n {
                        let d = f(&tree, &mut Borrowed(&rows), &cfg, Some(&nb), &mut r);
                        len += d.unwrap().accepted.len();
                    }
                    *t_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
                }
                println!(
                    "{case:27} {name:23}: before {:6.1} µs, after {:6.1} µs per step \
                     (mean accepted {:.2})",
                    us[0],
                    us[1],
                    len as f64 / n as f64
                );
            }
        }
    }
}
