//! Acceptance rules as plain functions over host-side probability rows, written to be read next
//! to the papers (method.md §2-4, llamagen-spec.md §5.3).
//!
//! Notation: `p` is the target row (after CFG and the sampling filters), `x` the draft, `A(x)` the
//! proximity set: the longest prefix of the first `k` latent neighbours of `x` whose cumulative
//! target mass stays within the relaxation's budget. Relaxed acceptance moves `p(A(x))` onto `x`.
use super::proximity::Neighbors;
use crate::{Error, Result};

/// How far acceptance may deviate from the target distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Relaxation {
    /// Standard (lossless) speculative decoding.
    Exact,
    /// LANTERN: absorb neighbour mass up to an additive TVD budget `delta`.
    Lantern {
        /// Neighbours considered per draft.
        k: usize,
        /// Additive budget in `[0, 1]` (`0` = exact).
        delta: f32,
    },
    /// LANTERN++: absorb neighbour mass so that `p(x) + p(A(x)) <= lambda * p(x)`.
    LanternPP {
        /// Neighbours considered per draft.
        k: usize,
        /// Multiplicative bound `>= 1` (`1` = exact).
        lambda: f32,
    },
}

impl Relaxation {
    /// Checks the parameters against a vocabulary of `vocab` codes.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let k = match *self {
            Relaxation::Exact => return Ok(()),
            Relaxation::Lantern { k, delta } => {
                if !(delta.is_finite() && (0.0..=1.0).contains(&delta)) {
                    return Err(Error::invalid(
                        "LANTERN delta",
                        format!("{delta} (use a value in [0, 1]; 0 = exact, typical 0.1-0.4)"),
                    ));
                }
                k
            }
            Relaxation::LanternPP { k, lambda } => {
                if !(lambda.is_finite() && lambda >= 1.0) {
                    return Err(Error::invalid(
                        "LANTERN++ lambda",
                        format!("{lambda} (use a finite value >= 1; 1 = exact, typical 5-20)"),
                    ));
                }
                k
            }
        };
        if k == 0 || k >= vocab {
            return Err(Error::invalid(
                "LANTERN k",
                format!("{k} for {vocab} codes (use 1 <= k < {vocab}; typical 1000)"),
            ));
        }
        Ok(())
    }

    /// Neighbours considered per draft (`0` for exact).
    pub fn k(&self) -> usize {
        match *self {
            Relaxation::Exact => 0,
            Relaxation::Lantern { k, .. } | Relaxation::LanternPP { k, .. } => k,
        }
    }

    /// Whether this rule can never absorb anything (exact, `delta = 0`, `lambda = 1`).
    pub fn is_exact(&self) -> bool {
        match *self {
            Relaxation::Exact => true,
            Relaxation::Lantern { delta, .. } => delta <= 0.0,
            Relaxation::LanternPP { lambda, .. } => lambda <= 1.0,
        }
    }

    /// Mass that may be absorbed onto a draft of target probability `px`: `delta` (LANTERN) or
    /// `(lambda - 1) * px` (LANTERN++).
    pub fn budget(&self, px: f32) -> f32 {
        match *self {
            Relaxation::Exact => 0.0,
            Relaxation::Lantern { delta, .. } => delta,
            Relaxation::LanternPP { lambda, .. } => (lambda - 1.0) * px,
        }
    }
}

/// What to sample from after a rejection.
///
/// The default is [`Residual::Standard`]: Cool-SD shows that `norm(max(0, p - q))` is the
/// TV-optimal residual for any relaxed rule whose acceptance is at least the standard one, and
/// with it the decoder keeps LANTERN's guarantee (TVD <= delta per position for deterministic
/// drafts, `effective <= lambda * p` pointwise for LANTERN++). [`Residual::Official`] reproduces
/// the public release, whose extra zeroing of the first `k + 1` neighbours moves the distortion
/// to `p(first k+1 neighbours of x)`, well above delta for large k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    /// As the public LANTERN release: zero `x` and, when `A(x)` is non-empty, its first `k + 1`
    /// neighbours; renormalise (uniform if nothing is left).
    Official,
    /// `norm(max(0, p - q))`: for a point-mass draft, `p` with `x` zeroed and renormalised.
    #[default]
    Standard,
}

/// Mass `p(A(x))` absorbed onto `draft` and the prefix length `|A(x)|`: the longest prefix of
/// the first `k` neighbours whose cumulative `p` stays `<= delta` (LANTERN) or
/// `<= (lambda - 1) * p(x)` (LANTERN++). `(0, 0)` for exact rules.
pub fn absorbed_mass(
    p: &[f32],
    draft: u32,
    neighbors: &Neighbors,
    relax: &Relaxation,
) -> (f32, usize) {
    let px = p.get(draft as usize).copied().unwrap_or(0.0);
    absorb_within(p, draft, neighbors, relax.k(), relax.budget(px))
}

/// [`absorbed_mass`] with an explicit budget (the tree driver shrinks it across siblings).
pub(crate) fn absorb_within(
    p: &[f32],
    draft: u32,
    nb: &Neighbors,
    k: usize,
    budget: f32,
) -> (f32, usize) {
    if budget.is_nan() || budget <= 0.0 || k == 0 || draft as usize >= nb.vocab() {
        return (0.0, 0);
    }
    let mut cum = 0.0f64;
    let mut len = 0;
    for j in 0..k.min(nb.k_max()) {
        let y = nb.neighbor(draft, j) as usize;
        let next = cum + p.get(y).copied().unwrap_or(0.0) as f64;
        if next > budget as f64 {
            break;
        }
        cum = next;
        len = j + 1;
    }
    (cum as f32, len)
}

/// Relaxed probability of accepting a deterministic (point-mass) draft: `min(1, p(x) + p(A))`.
pub fn accept_prob_deterministic(px: f32, absorbed: f32) -> f32 {
    (px + absorbed).min(1.0)
}

/// Relaxed probability of accepting a sampled draft with drafter probability `q`:
/// `min(1, (p(x) + p(A)) / q)`.
pub fn accept_prob_sampled(px: f32, absorbed: f32, q: f32) -> f32 {
    let num = px + absorbed;
    if q > 0.0 {
        (num / q).min(1.0)
    } else if num > 0.0 {
        1.0
    } else {
        0.0
    }
}

/// Greedy test: raise only `p(x)` by `absorbed` and accept iff `x` is then the argmax (first
/// index wins ties, as torch.argmax). With `absorbed = 0` this is `x == argmax p`.
pub fn greedy_accepts(p: &[f32], draft: u32, absorbed: f32) -> bool {
    let x = draft as usize;
    let Some(&px) = p.get(x) else { return false };
    let boosted = px + absorbed;
    p[..x].iter().all(|&y| y < boosted) && p[x + 1..].iter().all(|&y| y <= boosted)
}

/// The f64 sum of a row, over four interleaved accumulators: a single running sum is one long
/// chain of dependent additions, which bounds acceptance's passes over a 16,384-code row by
/// the adder's latency rather than by the loads.
pub(crate) fn sum_f64(row: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut chunks = row.chunks_exact(4);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Scales a row to sum 1 in place; returns false (row untouched) when its sum is not positive.
pub(crate) fn normalize(row: &mut [f32]) -> bool {
    let s = sum_f64(row);
    if s.is_nan() || s <= 0.0 || !s.is_finite() {
        return false;
    }
    let inv = (1.0 / s) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
    true
}

/// Renormalises, falling back to uniform when nothing is left (official behaviour).
pub(crate) fn normalize_or_uniform(row: &mut [f32]) {
    if !normalize(row) {
        let u = 1.0 / row.len().max(1) as f32;
        row.iter_mut().for_each(|x| *x = u);
    }
}

/// Residual after rejecting a deterministic draft `x` (prefix length `a_len` of `A(x)`), in place.
pub fn residual_deterministic(
    p: &mut [f32],
    draft: u32,
    a_len: usize,
    k: usize,
    neighbors: Option<&Neighbors>,
    residual: Residual,
) {
    let x = draft as usize;
    if x < p.len() {
        p[x] = 0.0;
    }
    if residual == Residual::Official && a_len > 0 {
        if let Some(nb) = neighbors {
            for j in 0..(k + 1).min(nb.k_max()) {
                let y = nb.neighbor(draft, j) as usize;
                if y < p.len() {
                    p[y] = 0.0;
                }
            }
        }
    }
    normalize_or_uniform(p);
}

/// Residual after rejecting a draft sampled from `q_cur` (the drafter distribution with the
/// earlier siblings removed, normalised): `norm(max(0, p - q_cur))`; `Official` first zeroes the
/// first `k + 1` neighbours of `x` in `q_cur` when `A(x)` was used (spec §5.3, our reading).
pub fn residual_sampled(
    p: &mut [f32],
    q_cur: &[f32],
    draft: u32,
    a_len: usize,
    k: usize,
    neighbors: Option<&Neighbors>,
    residual: Residual,
) {
    let zeroed;
    let q = match neighbors {
        Some(nb) if residual == Residual::Official && a_len > 0 => {
            let mut q = q_cur.to_vec();
            for j in 0..(k + 1).min(nb.k_max()) {
                let y = nb.neighbor(draft, j) as usize;
                if y < q.len() {
                    q[y] = 0.0;
                }
            }
            normalize(&mut q);
            zeroed = q;
            &zeroed[..]
        }
        _ => q_cur,
    };
    // norm(max(0, p - q)) in place, as `normalize` of the difference computes it (the same
    // f64 sums, the same f32 scale): two passes, no copies
    let mut acc = [0f64; 4];
    let (mut pc, mut qc) = (p.chunks_exact(4), q.chunks_exact(4));
    for (a4, b4) in (&mut pc).zip(&mut qc) {
        for ((s, a), b) in acc.iter_mut().zip(a4).zip(b4) {
            *s += (a - b).max(0.0) as f64;
        }
    }
    let tail: f64 = pc
        .remainder()
        .iter()
        .zip(qc.remainder())
        .map(|(a, b)| (a - b).max(0.0) as f64)
        .sum();
    let s = (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail;
    if !(s.is_nan() || s <= 0.0 || !s.is_finite()) {
        let inv = (1.0 / s) as f32;
        p.iter_mut()
            .zip(q)
            .for_each(|(a, b)| *a = (*a - b).max(0.0) * inv);
    } else if residual == Residual::Official {
        normalize_or_uniform(p);
    }
    // Standard with nothing left: p == q up to rounding, where acceptance is certain; keep p.
}

/// Total variation distance `0.5 * sum |a - b|`.
pub fn tvd(a: &[f32], b: &[f32]) -> f32 {
    (0.5 * a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::Metric;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `residual_sampled` written as the formula reads (copies, then `normalize`).
    fn reference(p: &mut [f32], q_cur: &[f32], x: u32, a_len: usize, k: usize, nb: &Neighbors) {
        let mut q = q_cur.to_vec();
        if a_len > 0 {
            for j in 0..(k + 1).min(nb.k_max()) {
                let y = nb.neighbor(x, j) as usize;
                q[y] = 0.0;
            }
            normalize(&mut q);
        }
        let mut r: Vec<f32> = p.iter().zip(&q).map(|(a, b)| (a - b).max(0.0)).collect();
        if normalize(&mut r) {
            p.copy_from_slice(&r);
        }
    }

    #[test]
    fn sampled_residual_is_the_normalised_positive_part_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(9);
        let v = 300;
        let cb: Vec<f32> = (0..v * 4).map(|_| rng.random::<f32>()).collect();
        let nb = Neighbors::build(&cb, v, 4, 6, Metric::L2).unwrap();
        let dist = |rng: &mut StdRng| -> Vec<f32> {
            let mut d: Vec<f32> = (0..v).map(|_| rng.random::<f32>().powi(3)).collect();
            normalize(&mut d);
            d
        };
        for case in 0..40 {
            let (p0, q) = (dist(&mut rng), dist(&mut rng));
            let x = rng.random_range(0..v as u32);
            let a_len = case % 3;
            for residual in [Residual::Standard, Residual::Official] {
                let mut got = p0.clone();
                residual_sampled(&mut got, &q, x, a_len, 4, Some(&nb), residual);
                let mut want = p0.clone();
                let official_len = if residual == Residual::Official {
                    a_len
                } else {
                    0
                };
                reference(&mut want, &q, x, official_len, 4, &nb);
                assert_eq!(got, want, "case {case} {residual:?}");
            }
        }
        // nothing left (p == q): p is kept
        let p = dist(&mut rng);
        let mut got = p.clone();
        residual_sampled(&mut got, &p, 0, 0, 4, None, Residual::Standard);
        assert_eq!(got, p);
    }
}
