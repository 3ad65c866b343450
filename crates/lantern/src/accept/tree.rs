//! Tree acceptance driver: walks a verified [`DraftTree`] from the root, testing the children
//! of the current node in sibling order with the configured rule, and reports the accepted
//! path, the bonus token and the exact per-position distortion (TVD).
use super::proximity::Neighbors;
use super::rules::{
    absorb_within, accept_prob_deterministic, accept_prob_sampled, greedy_accepts, normalize,
    residual_deterministic, residual_sampled, sum_f64, tvd, Relaxation, Residual,
};
use crate::decode::tree::{DraftKind, DraftTree};
use crate::sampling::{argmax, row_total, sample_index, sample_index_total};
use crate::{Error, Result};
use rand::Rng;
use std::borrow::Cow;

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
    if sampled && cfg.residual == Residual::Standard {
        let w = SampledWalk::run(tree, node, &children, p, cfg, neighbors, false)?;
        let (residual, effective) = (w.residual().to_vec(), w.effective(&w.lane));
        return Ok(SiblingChain {
            accept: w.lane.accept,
            absorbed: w.lane.absorbed,
            residual,
            effective,
        });
    }
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

/// The drafter distribution the children of `node` were drawn from (a device row is read once,
/// on first use), checked against the vocabulary `v`.
fn drafter_row(tree: &DraftTree, node: usize, v: usize) -> Result<&[f32]> {
    let qd = tree
        .q_dists
        .get(node)
        .and_then(|q| q.as_ref())
        .ok_or_else(|| {
            Error::invalid(
                "draft tree",
                format!("node {node} has sampled children but no drafter distribution (q_dists)"),
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
    Ok(qd)
}
/// `1 / s` as the f32 scale `normalize` applies, or `None` where `normalize` leaves the row.
fn inv_of(s: f64) -> Option<f32> {
    if s.is_nan() || s <= 0.0 || !s.is_finite() {
        None
    } else {
        Some((1.0 / s) as f32)
    }
}

/// The whole chunks `r`, `q` (equal lengths, multiples of 4) of one [`chain_pass`] without
/// special positions: `R` updates the residual, `Q` scales `q`, `S` accumulates the sums.
#[inline(always)]
fn pass_plain<const R: bool, const Q: bool, const S: bool>(
    r: &mut [f32],
    q: &mut [f32],
    ir: f32,
    iq: f32,
    acc1: &mut [f64; 4],
    acc2: &mut [f64; 4],
) {
    #[cfg(target_arch = "x86_64")]
    if S && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above)
        unsafe { pass_sums_avx2::<R, Q>(r, q, ir, iq, acc1, acc2) };
        return;
    }
    // the sums in locals: the lanes stay in registers across the loop
    let (mut a1, mut a2) = (*acc1, *acc2);
    for (r4, q4) in r.chunks_exact_mut(4).zip(q.chunks_exact_mut(4)) {
        let (r4, q4): (&mut [f32; 4], &mut [f32; 4]) =
            (r4.try_into().unwrap(), q4.try_into().unwrap());
        let mut rn = *r4;
        let mut qn = *q4;
        for l in 0..4 {
            if R {
                rn[l] = (r4[l] - q4[l]).max(0.0) * ir;
            }
            if Q {
                qn[l] = q4[l] * iq;
            }
        }
        *r4 = rn;
        *q4 = qn;
        if S {
            for l in 0..4 {
                a1[l] += (rn[l] - qn[l]).max(0.0) as f64;
                a2[l] += qn[l] as f64;
            }
        }
    }
    (*acc1, *acc2) = (a1, a2);
}

/// [`pass_plain`] with sums, in AVX: the four f64 lanes of each sum are one register, so each
/// lane takes its terms in the same order (same values; `max(x, 0)` returns the second operand
/// for NaN and zeros, as the scalar lowering of `f32::max(x, 0.0)` does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pass_sums_avx2<const R: bool, const Q: bool>(
    r: &mut [f32],
    q: &mut [f32],
    ir: f32,
    iq: f32,
    acc1: &mut [f64; 4],
    acc2: &mut [f64; 4],
) {
    use std::arch::x86_64::*;
    let n = r.len().min(q.len()) / 4 * 4;
    let (vir, viq, zero) = (_mm_set1_ps(ir), _mm_set1_ps(iq), _mm_setzero_ps());
    let mut a1 = _mm256_loadu_pd(acc1.as_ptr());
    let mut a2 = _mm256_loadu_pd(acc2.as_ptr());
    let (rp, qp) = (r.as_mut_ptr(), q.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let r4 = _mm_loadu_ps(rp.add(i));
        let q4 = _mm_loadu_ps(qp.add(i));
        let rn = if R {
            _mm_mul_ps(_mm_max_ps(_mm_sub_ps(r4, q4), zero), vir)
        } else {
            r4
        };
        let qn = if Q { _mm_mul_ps(q4, viq) } else { q4 };
        _mm_storeu_ps(rp.add(i), rn);
        _mm_storeu_ps(qp.add(i), qn);
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm_max_ps(_mm_sub_ps(rn, qn), zero)));
        a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(qn));
        i += 4;
    }
    _mm256_storeu_pd(acc1.as_mut_ptr(), a1);
    _mm256_storeu_pd(acc2.as_mut_ptr(), a2);
}

/// One pass of a sampled sibling chain over the residual `r` and the drafter row `q`, in place:
/// the residual step `r = max(0, r - q) * inv_r` (skipped for `None`), then `q[zero_q] = 0`
/// and `q *= inv_q` (unscaled for `None`); with `next`, also the two sums the following sibling
/// needs, `sum max(0, r - q)` and `sum q` with `q[next]` read as 0, accumulated in the order of
/// [`super::rules::sum_f64`] (four interleaved lanes, then the tail), so the results are those
/// of `residual_sampled`, `normalize` and their sums bit for bit, in one pass instead of four.
fn chain_pass(
    r: &mut [f32],
    q: &mut [f32],
    inv_r: Option<f32>,
    inv_q: Option<f32>,
    zero_q: Option<usize>,
    next: Option<usize>,
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); the body is the same Rust code, which
        // LLVM vectorises with wider registers (IEEE operations, no contraction: same values)
        return unsafe { chain_pass_avx2(r, q, inv_r, inv_q, zero_q, next) };
    }
    chain_pass_body(r, q, inv_r, inv_q, zero_q, next)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn chain_pass_avx2(
    r: &mut [f32],
    q: &mut [f32],
    inv_r: Option<f32>,
    inv_q: Option<f32>,
    zero_q: Option<usize>,
    next: Option<usize>,
) -> (f64, f64) {
    chain_pass_body(r, q, inv_r, inv_q, zero_q, next)
}

#[inline(always)]
fn chain_pass_body(
    r: &mut [f32],
    q: &mut [f32],
    inv_r: Option<f32>,
    inv_q: Option<f32>,
    zero_q: Option<usize>,
    next: Option<usize>,
) -> (f64, f64) {
    let n = r.len().min(q.len());
    let (r, q) = (&mut r[..n], &mut q[..n]);
    let full = n / 4;
    let (mut a1, mut a2) = ([0f64; 4], [0f64; 4]);
    let (ir, iq) = (inv_r.unwrap_or(1.0), inv_q.unwrap_or(1.0));
    // one element with every case, for the chunks holding `zero_q` or `next` and the tail
    let elem = |r: &mut f32, q: &mut f32, i: usize| -> (f64, f64) {
        let rn = match inv_r {
            Some(ir) => (*r - *q).max(0.0) * ir,
            None => *r,
        };
        let qz = if Some(i) == zero_q { 0.0 } else { *q };
        let qn = match inv_q {
            Some(iq) => qz * iq,
            None => qz,
        };
        *r = rn;
        *q = qn;
        let s2 = if Some(i) == next { 0.0 } else { qn };
        ((rn - qn).max(0.0) as f64, s2 as f64)
    };
    let mut special: Vec<usize> = [zero_q, next]
        .into_iter()
        .flatten()
        .map(|i| i / 4)
        .filter(|&c| c < full)
        .collect();
    special.sort_unstable();
    special.dedup();
    let sums = next.is_some();
    let mut c0 = 0;
    for c1 in special.into_iter().chain(std::iter::once(full)) {
        let (rs, qs) = (&mut r[c0 * 4..c1 * 4], &mut q[c0 * 4..c1 * 4]);
        match (inv_r.is_some(), inv_q.is_some(), sums) {
            (true, true, true) => pass_plain::<true, true, true>(rs, qs, ir, iq, &mut a1, &mut a2),
            (true, true, false) => {
                pass_plain::<true, true, false>(rs, qs, ir, iq, &mut a1, &mut a2)
            }
            (true, false, true) => {
                pass_plain::<true, false, true>(rs, qs, ir, iq, &mut a1, &mut a2)
            }
            (true, false, false) => {
                pass_plain::<true, false, false>(rs, qs, ir, iq, &mut a1, &mut a2)
            }
            (false, true, true) => {
                pass_plain::<false, true, true>(rs, qs, ir, iq, &mut a1, &mut a2)
            }
            (false, true, false) => {
                pass_plain::<false, true, false>(rs, qs, ir, iq, &mut a1, &mut a2)
            }
            (false, false, true) => {
                pass_plain::<false, false, true>(rs, qs, ir, iq, &mut a1, &mut a2)
            }
            (false, false, false) => {}
        }
        if c1 == full {
            break;
        }
        for l in 0..4 {
            let i = c1 * 4 + l;
            let (t1, t2) = elem(&mut r[i], &mut q[i], i);
            if sums {
                a1[l] += t1;
                a2[l] += t2;
            }
        }
        c0 = c1 + 1;
    }
    let (mut t1, mut t2) = ([0f64; 3], [0f64; 3]);
    for (j, i) in (full * 4..n).enumerate() {
        (t1[j], t2[j]) = elem(&mut r[i], &mut q[i], i);
    }
    let m = n - full * 4;
    let tail1: f64 = t1[..m].iter().copied().sum();
    let tail2: f64 = t2[..m].iter().copied().sum();
    (
        (a1[0] + a1[1]) + (a1[2] + a1[3]) + tail1,
        (a2[0] + a2[1]) + (a2[2] + a2[3]) + tail2,
    )
}

/// One rule's walk along a sibling chain: the tested children's acceptance probabilities and
/// absorbed masses, the probability of reaching the next sibling, and the accepted mass per
/// drafted code (the non-residual part of the effective distribution).
struct Lane {
    relaxation: Relaxation,
    accept: Vec<f32>,
    absorbed: Vec<f32>,
    reach: f64,
    /// `(code, reach * accept)` summed per code in sibling order, from 0.0.
    mass: Vec<(usize, f64)>,
    live: bool,
    /// The residual at the sibling where this lane stopped, when the walk went on for another.
    residual: Option<Vec<f32>>,
}

impl Lane {
    fn new(relaxation: Relaxation, n: usize) -> Self {
        Self {
            relaxation,
            accept: Vec::with_capacity(n),
            absorbed: Vec::with_capacity(n),
            reach: 1.0,
            mass: Vec::new(),
            live: true,
            residual: None,
        }
    }

    /// Tests sampled draft `x` (drafter probability `qx`) against the residual `r`, as
    /// [`sibling_chain`] does; the lane stops where the reach drops to zero.
    fn test(&mut self, r: &[f32], x: u32, qx: f32, neighbors: Option<&Neighbors>) {
        let rx = r[x as usize];
        let budget = self.relaxation.budget(rx);
        let (abs, _) = match neighbors {
            Some(nb) => absorb_within(r, x, nb, self.relaxation.k(), budget),
            None => (0.0, 0),
        };
        let a = accept_prob_sampled(rx, abs, qx);
        self.accept.push(a);
        self.absorbed.push(abs);
        let add = self.reach * a as f64;
        match self.mass.iter_mut().find(|(y, _)| *y == x as usize) {
            Some((_, m)) => *m += add,
            None => self.mass.push((x as usize, 0.0 + add)),
        }
        self.reach *= 1.0 - a as f64;
        if self.reach <= 0.0 {
            self.live = false;
        }
    }

    /// The effective probability of code `i` as an f32 (`r_i`: the final residual there).
    #[inline(always)]
    fn effective_at(&self, base: f64, r_i: f32) -> f32 {
        if self.reach > 0.0 {
            (base + self.reach * r_i as f64) as f32
        } else {
            base as f32
        }
    }

    /// The accepted mass per code as a sorted list (for a walk over the codes in order).
    fn sorted_mass(&self) -> Vec<(usize, f64)> {
        let mut m = self.mass.clone();
        m.sort_unstable_by_key(|&(y, _)| y);
        m
    }
}

/// A sampled sibling chain with the standard residual, walked once for the configured rule
/// and, with `shadow`, for the exact rule too: both share the residual and the drafter row
/// (the standard residual does not depend on the absorbed mass), so the exact chain that the
/// distortion statistic needs costs no extra pass.
struct SampledWalk<'p> {
    lane: Lane,
    /// The residual where the walk ended (the target row itself when no sibling was rejected).
    r: Cow<'p, [f32]>,
    /// `tvd(effective, exact effective)` as [`tvd`] computes it (0 without the exact lane).
    distortion: f32,
    /// [`row_total`] of [`Self::residual`], where the walk's last pass took it.
    total: Option<f64>,
}

impl<'p> SampledWalk<'p> {
    /// Walks the children of `node`; with `step`, also what a step of [`accept_tree`] reads:
    /// the exact lane and the distortion (relaxed rules) and the total of the residual.
    fn run(
        tree: &DraftTree,
        node: usize,
        children: &[usize],
        p: &'p [f32],
        cfg: &AcceptConfig,
        neighbors: Option<&Neighbors>,
        step: bool,
    ) -> Result<Self> {
        let v = p.len();
        let qd = drafter_row(tree, node, v)?;
        let mut r = Cow::Borrowed(p);
        let mut q = Vec::new();
        let (mut s1, mut s2) = (0.0, 0.0);
        let token = |j: usize| children.get(j).map(|&c| tree.tokens[c] as usize);
        let mut lane = Lane::new(cfg.relaxation, children.len());
        let shadow = step && !cfg.relaxation.is_exact();
        let mut exact = shadow.then(|| Lane::new(Relaxation::Exact, children.len()));
        for (j, &c) in children.iter().enumerate() {
            let x = tree.tokens[c];
            if x as usize >= v {
                return Err(Error::invalid(
                    "draft tree",
                    format!("node {c} drafts token {x}, vocabulary has {v} codes"),
                ));
            }
            let qx = tree.q.get(c).copied().unwrap_or(0.0);
            if lane.live {
                lane.test(&r, x, qx, neighbors);
            }
            if let Some(e) = exact.as_mut().filter(|e| e.live) {
                e.test(&r, x, qx, None);
            }
            let exact_live = exact.as_ref().is_some_and(|e| e.live);
            if !lane.live && !exact_live {
                let distortion = exact.as_ref().map_or(0.0, |e| stopped_tvd(&r, &lane, e));
                return Ok(Self {
                    lane,
                    r,
                    distortion,
                    total: None,
                });
            }
            if !lane.live && lane.residual.is_none() {
                lane.residual = Some(r.to_vec());
            }
            if j == 0 {
                // q normalised and the sums of the first residual step: the pass that once
                // came before the first test, which reads neither (it leaves `r` as it is),
                // so it waits for a rejection that may never come
                q = qd.to_vec();
                let inv_q = inv_of(sum_f64(qd));
                (s1, s2) = chain_pass(r.to_mut(), &mut q, None, inv_q, None, token(0));
            }
            if j + 1 < children.len() {
                (s1, s2) = chain_pass(
                    r.to_mut(),
                    &mut q,
                    inv_of(s1),
                    inv_of(s2),
                    Some(x as usize),
                    token(j + 1),
                );
            }
        }
        // every child tested (or none): the last residual step, with the step's sums
        let inv_r = if children.is_empty() {
            None
        } else {
            inv_of(s1)
        };
        let want_total = step && lane.live;
        let (total, dist) = last_pass(r.to_mut(), &q, inv_r, &lane, exact.as_ref(), want_total);
        Ok(Self {
            distortion: dist.map_or(0.0, |d| (0.5 * d) as f32),
            lane,
            r,
            total,
        })
    }

    /// The configured rule's residual.
    fn residual(&self) -> &[f32] {
        self.lane.residual.as_deref().unwrap_or(&self.r)
    }

    /// The configured rule's effective distribution.
    fn effective(&self, lane: &Lane) -> Vec<f32> {
        let mut e: Vec<f32> = self
            .r
            .iter()
            .map(|&ri| lane.effective_at(0.0, ri))
            .collect();
        for (y, m) in lane.sorted_mass() {
            e[y] = lane.effective_at(m, self.r[y]);
        }
        e
    }
}

/// The codes where either lane accepted mass, in order, with the two masses (0.0 where a lane
/// has none, as [`Lane::effective_at`] reads a code without mass).
fn marks(lane: &Lane, exact: &Lane) -> Vec<(usize, f64, f64)> {
    let mut m: Vec<(usize, f64, f64)> = lane.mass.iter().map(|&(y, a)| (y, a, 0.0)).collect();
    for &(y, b) in &exact.mass {
        match m.iter_mut().find(|e| e.0 == y) {
            Some(e) => e.2 = b,
            None => m.push((y, 0.0, b)),
        }
    }
    m.sort_unstable_by_key(|e| e.0);
    m
}

/// One code's term of [`tvd`] between the two lanes' effective rows.
#[inline(always)]
fn tvd_term(lane: &Lane, exact: &Lane, bl: f64, be: f64, ri: f32) -> f64 {
    (lane.effective_at(bl, ri) as f64 - exact.effective_at(be, ri) as f64).abs()
}

/// The distortion where the walk stopped with neither lane reaching further: both effective
/// rows are then their accepted masses alone, every other code adds `|0 - 0| = +0.0`, which
/// leaves a running sum as it is (never -0.0 after the first of the row's terms), so the sum
/// over the marked codes in order, from +0.0, is [`tvd`]'s sum bit for bit.
fn stopped_tvd(r: &[f32], lane: &Lane, exact: &Lane) -> f32 {
    let sum = marks(lane, exact)
        .into_iter()
        .fold(0.0f64, |s, (y, bl, be)| {
            s + tvd_term(lane, exact, bl, be, r[y])
        });
    (0.5 * sum) as f32
}

/// The walk's last residual step, `r = max(0, r - q) * inv_r` as [`chain_pass`] takes it (`r`
/// kept for `None`; the drafter row is not read again, so it is not updated), with the sums a
/// step reads over the new residual taken in the same pass, each a sequential f64 sum in index
/// order from -0.0 as `Iterator::sum` takes it: with `total`, [`row_total`], and with `exact`,
/// the sum of [`tvd`] between the two lanes' effective rows. Both are chains of dependent
/// additions; side by side with the residual step, they cost one pass instead of three.
fn last_pass(
    r: &mut [f32],
    q: &[f32],
    inv_r: Option<f32>,
    lane: &Lane,
    exact: Option<&Lane>,
    total: bool,
) -> (Option<f64>, Option<f64>) {
    let marks = exact.map_or(Vec::new(), |e| marks(lane, e));
    let ir = inv_r.unwrap_or(1.0);
    let (t, d) = match (inv_r.is_some(), total, exact) {
        (true, true, Some(e)) => last_pass_body::<true, true, true>(r, q, ir, lane, e, &marks),
        (true, false, Some(e)) => last_pass_body::<true, false, true>(r, q, ir, lane, e, &marks),
        (true, true, None) => last_pass_body::<true, true, false>(r, q, ir, lane, lane, &marks),
        (true, false, None) => last_pass_body::<true, false, false>(r, q, ir, lane, lane, &marks),
        (false, true, Some(e)) => last_pass_body::<false, true, true>(r, q, ir, lane, e, &marks),
        (false, false, Some(e)) => last_pass_body::<false, false, true>(r, q, ir, lane, e, &marks),
        (false, true, None) => last_pass_body::<false, true, false>(r, q, ir, lane, lane, &marks),
        (false, false, None) => (0.0, 0.0),
    };
    (total.then_some(t), exact.map(|_| d))
}

/// [`last_pass`] with its cases as constants: `R` residual step, `T` total, `D` distortion.
#[inline(always)]
fn last_pass_body<const R: bool, const T: bool, const D: bool>(
    r: &mut [f32],
    q: &[f32],
    ir: f32,
    lane: &Lane,
    exact: &Lane,
    marks: &[(usize, f64, f64)],
) -> (f64, f64) {
    let n = r.len();
    let q = if R { &q[..n] } else { q };
    let (mut total, mut dist) = (-0.0f64, -0.0f64);
    let mut step = |r: &mut f32, q: f32, bl: f64, be: f64| {
        let rn = if R { (*r - q).max(0.0) * ir } else { *r };
        *r = rn;
        if T {
            total += rn as f64;
        }
        if D {
            dist += tvd_term(lane, exact, bl, be, rn);
        }
    };
    let qi = |i: usize| if R { q[i] } else { 0.0 };
    let mut from = 0;
    for &(y, bl, be) in marks.iter().chain(std::iter::once(&(n, 0.0, 0.0))) {
        for (i, ri) in r[from..y].iter_mut().enumerate() {
            step(ri, qi(from + i), 0.0, 0.0);
        }
        if y == n {
            break;
        }
        step(&mut r[y], qi(y), bl, be);
        from = y + 1;
    }
    (total, dist)
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

    /// The sibling chain as the rules read, one function call per step (the reference the
    /// shared walk must reproduce bit for bit).
    fn reference_chain(
        tree: &DraftTree,
        node: usize,
        p: &[f32],
        cfg: &AcceptConfig,
        neighbors: Option<&Neighbors>,
    ) -> Result<SiblingChain> {
        let v = p.len();
        let children = tree.children(node);
        let k = cfg.relaxation.k();
        let mut q_cur = drafter_row(tree, node, v)?.to_vec();
        normalize(&mut q_cur);
        let mut r = p.to_vec();
        let mut reach = 1.0f64;
        let (mut accept, mut absorbed) = (Vec::new(), Vec::new());
        let mut effective = vec![0.0f64; v];
        for &c in &children {
            let x = tree.tokens[c];
            if x as usize >= v {
                return Err(Error::invalid("draft tree", "bad token"));
            }
            let rx = r[x as usize];
            let (abs, len) = match neighbors {
                Some(nb) => absorb_within(&r, x, nb, k, cfg.relaxation.budget(rx)),
                None => (0.0, 0),
            };
            let a = accept_prob_sampled(rx, abs, tree.q.get(c).copied().unwrap_or(0.0));
            accept.push(a);
            absorbed.push(abs);
            effective[x as usize] += reach * a as f64;
            reach *= 1.0 - a as f64;
            if reach <= 0.0 {
                break;
            }
            residual_sampled(&mut r, &q_cur, x, len, k, neighbors, cfg.residual);
            q_cur[x as usize] = 0.0;
            normalize(&mut q_cur);
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
            let chain = reference_chain(tree, node, p, cfg, neighbors)?;
            tvds.push(if cfg.relaxation.is_exact() {
                0.0
            } else {
                let exact = reference_chain(tree, node, p, &exact_cfg, None)?;
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
                    let want = reference_chain(&tree, node, &rows[node], &cfg, Some(&nb)).unwrap();
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
