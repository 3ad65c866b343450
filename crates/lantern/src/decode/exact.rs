//! Exact (lossless) tree acceptance, local to the decode module so that the loops can be tested
//! on their own. It has the signature of `crate::accept::accept_tree`; the speculative loop
//! imports the acceptance API from one place ([`super::speculative`]) so either can be used.
//!
//! Deterministic drafts (point-mass q): accept child x with probability p(x); on rejection
//! p <- norm(p with x zeroed). Drafts drawn without replacement: child i was drawn from
//! q_i = q with earlier siblings zeroed, renormalised; accept with min(1, p(x)/q_i(x)); on
//! rejection p <- norm(max(0, p - q_i)) (recursive rejection sampling). After the last accepted
//! node the next token is drawn from the current p (the residual, or the bonus row).
use super::tree::{DraftKind, DraftTree};
use crate::sampling::sample_index;
use crate::Result;
use rand::{Rng, RngCore};

/// Target probabilities (after CFG and filters) for the position after a tree node.
pub trait TargetRows {
    /// Probability row predicting the child of `node`.
    fn row(&mut self, node: usize) -> Result<Vec<f32>>;
}

/// Latent-neighbour table for relaxed acceptance (placeholder: exact acceptance ignores it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Neighbors;

/// Acceptance settings (this exact implementation reads only `greedy`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AcceptConfig {
    /// Relaxation budget (unused here: exact acceptance).
    pub relaxation: f32,
    /// Residual rule (unused here).
    pub residual: u8,
    /// Greedy decoding: accept while the draft is the argmax, next token = argmax.
    pub greedy: bool,
}

/// What one step accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeDecision {
    /// Accepted node ids, root to leaf, root excluded.
    pub accepted: Vec<usize>,
    /// Token following the last accepted node (bonus or residual sample).
    pub next_token: u32,
    /// Per accepted token, the TVD between the sampled and target distributions (0: exact).
    pub tvd: Vec<f32>,
}

fn normalise(p: &mut [f32]) {
    let s: f32 = p.iter().sum();
    if s > 0.0 {
        p.iter_mut().for_each(|x| *x /= s);
    } else {
        let u = 1.0 / p.len() as f32;
        p.iter_mut().for_each(|x| *x = u);
    }
}

fn argmax(p: &[f32]) -> usize {
    crate::sampling::argmax(p)
}

/// Exact tree acceptance with the signature of `crate::accept::accept_tree`.
pub fn exact_accept_tree(
    tree: &DraftTree,
    rows: &mut dyn TargetRows,
    cfg: &AcceptConfig,
    _neighbors: Option<&Neighbors>,
    rng: &mut dyn RngCore,
) -> Result<TreeDecision> {
    let mut node = 0;
    let mut accepted = Vec::new();
    loop {
        let mut p = rows.row(node)?;
        let children = tree.children(node);
        if cfg.greedy {
            let best = argmax(&p) as u32;
            match children.iter().find(|&&c| tree.tokens[c] == best) {
                Some(&c) => {
                    accepted.push(c);
                    node = c;
                    continue;
                }
                None => {
                    let tvd = vec![0.0; accepted.len()];
                    return Ok(TreeDecision {
                        accepted,
                        next_token: best,
                        tvd,
                    });
                }
            }
        }
        let mut next = None;
        // remaining drafter distribution for without-replacement siblings
        let mut q_rem: Option<Vec<f32>> = match tree.kind {
            DraftKind::WithoutReplacement => tree.q_dists.get(node).cloned().flatten(),
            DraftKind::Deterministic => None,
        };
        for &c in &children {
            let x = tree.tokens[c] as usize;
            let u: f32 = rng.random::<f32>();
            match q_rem.as_mut() {
                None => {
                    if u < p[x] {
                        next = Some(c);
                        break;
                    }
                    p[x] = 0.0;
                    normalise(&mut p);
                }
                Some(q) => {
                    normalise(q);
                    let qx = q[x];
                    if qx > 0.0 && u * qx < p[x] {
                        next = Some(c);
                        break;
                    }
                    for (pi, qi) in p.iter_mut().zip(q.iter()) {
                        *pi = (*pi - qi).max(0.0);
                    }
                    normalise(&mut p);
                    q[x] = 0.0;
                }
            }
        }
        match next {
            Some(c) => {
                accepted.push(c);
                node = c;
            }
            None => {
                let next_token = sample_index(&p, rng) as u32;
                let tvd = vec![0.0; accepted.len()];
                return Ok(TreeDecision {
                    accepted,
                    next_token,
                    tvd,
                });
            }
        }
    }
}
