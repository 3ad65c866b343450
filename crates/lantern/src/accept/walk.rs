//! A sampled sibling chain with the standard residual, walked in fused passes over the target
//! and drafter rows ([`SampledWalk`]): the configured rule and, for the distortion statistic,
//! the exact rule share each pass. Every sum keeps the order of the one-rule-at-a-time code in
//! [`super::rules`], so the results are bit-identical to it (tests in [`super::tree`]).
use super::proximity::Neighbors;
use super::rules::{absorb_within, accept_prob_sampled, sum_f64, Relaxation};
use super::tree::AcceptConfig;
use crate::decode::tree::DraftTree;
use crate::{Error, Result};
use std::borrow::Cow;

/// The drafter distribution the children of `node` were drawn from (a device row is read once,
/// on first use), checked against the vocabulary `v`.
pub(super) fn drafter_row(tree: &DraftTree, node: usize, v: usize) -> Result<&[f32]> {
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
pub(super) struct Lane {
    relaxation: Relaxation,
    pub(super) accept: Vec<f32>,
    pub(super) absorbed: Vec<f32>,
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
    /// [`super::tree::sibling_chain`] does; the lane stops where the reach drops to zero.
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
pub(super) struct SampledWalk<'p> {
    pub(super) lane: Lane,
    /// The residual where the walk ended (the target row itself when no sibling was rejected).
    r: Cow<'p, [f32]>,
    /// `tvd(effective, exact effective)` as [`super::rules::tvd`] computes it (0 without the exact lane).
    pub(super) distortion: f32,
    /// [`crate::sampling::row_total`] of [`Self::residual`], where the walk's last pass took it.
    pub(super) total: Option<f64>,
}

impl<'p> SampledWalk<'p> {
    /// Walks the children of `node`; with `step`, also what a step of [`super::tree::accept_tree`] reads:
    /// the exact lane and the distortion (relaxed rules) and the total of the residual.
    pub(super) fn run(
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
    pub(super) fn residual(&self) -> &[f32] {
        self.lane.residual.as_deref().unwrap_or(&self.r)
    }

    /// The configured rule's effective distribution.
    pub(super) fn effective(&self, lane: &Lane) -> Vec<f32> {
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

/// One code's term of [`super::rules::tvd`] between the two lanes' effective rows.
#[inline(always)]
fn tvd_term(lane: &Lane, exact: &Lane, bl: f64, be: f64, ri: f32) -> f64 {
    (lane.effective_at(bl, ri) as f64 - exact.effective_at(be, ri) as f64).abs()
}

/// The distortion where the walk stopped with neither lane reaching further: both effective
/// rows are then their accepted masses alone, every other code adds `|0 - 0| = +0.0`, which
/// leaves a running sum as it is (never -0.0 after the first of the row's terms), so the sum
/// over the marked codes in order, from +0.0, is [`super::rules::tvd`]'s sum bit for bit.
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
/// order from -0.0 as `Iterator::sum` takes it: with `total`, [`crate::sampling::row_total`], and with `exact`,
/// the sum of [`super::rules::tvd`] between the two lanes' effective rows. Both are chains of dependent
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
