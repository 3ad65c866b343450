//! Classifier-free guidance and LlamaGen's sampling filters, on host-side logit rows.
//!
//! Order (LlamaGen `sample`): divide by `max(temperature, 1e-5)`, then top-k (ties with the k-th
//! logit kept), then top-p (the first token crossing `p` kept, top-1 always kept), softmax.
//! Temperature 0 means greedy decoding.
use crate::{Error, Result};
use rand::Rng;

/// Sampling settings applied to the CFG-combined logits of every position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Temperature; `0.0` selects greedy (argmax) decoding.
    pub temperature: f32,
    /// Keep only the `top_k` largest logits (`0` = all).
    pub top_k: usize,
    /// Nucleus threshold in `(0, 1]` (`1.0` = off).
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 1e-5
    }

    /// Checks the values, with an error that says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "temperature",
                format!("{} (use a finite value >= 0; 0 = greedy)", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top-p",
                format!("{} (use a value in (0, 1]; 1 = off)", self.top_p),
            ));
        }
        Ok(())
    }

    /// Target probabilities of one row of (CFG-combined) logits after temperature, top-k and
    /// top-p. For greedy settings this is a point mass on the argmax.
    pub fn probs(&self, logits: &[f32]) -> Vec<f32> {
        if self.is_greedy() {
            let mut p = vec![0.0; logits.len()];
            p[argmax(logits)] = 1.0;
            return p;
        }
        let t = self.temperature.max(1e-5);
        let mut l: Vec<f32> = logits.iter().map(|x| x / t).collect();
        let v = l.len();
        if self.top_k > 0 && self.top_k < v {
            let mut sorted = l.clone();
            let k = self.top_k.max(1);
            sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            for x in l.iter_mut() {
                if *x < kth {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if self.top_p < 1.0 {
            let mut idx: Vec<usize> = (0..v).collect();
            idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            let probs = softmax(&l);
            let mut cum = 0.0f32;
            let mut remove = vec![false; v];
            // remove where cumsum > p, shifted right by one: the first crossing token stays.
            let mut prev_cum = 0.0f32;
            for (rank, &i) in idx.iter().enumerate() {
                cum += probs[i];
                if rank > 0 && prev_cum > self.top_p {
                    remove[i] = true;
                }
                prev_cum = cum;
            }
            for (x, r) in l.iter_mut().zip(remove) {
                if r {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        softmax(&l)
    }
}

/// `uncond + scale * (cond - uncond)`, LlamaGen's CFG on logits (f32).
pub fn cfg_mix(cond: &[f32], uncond: &[f32], scale: f32) -> Vec<f32> {
    cond.iter()
        .zip(uncond)
        .map(|(c, u)| u + scale * (c - u))
        .collect()
}

/// Numerically stable softmax of a row (all `-inf` gives a uniform row).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return vec![1.0 / logits.len() as f32; logits.len()];
    }
    let mut out: Vec<f32> = logits.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = out.iter().sum();
    out.iter_mut().for_each(|x| *x /= s);
    out
}

/// Index of the largest value (first on ties), as torch.argmax on CPU.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Probabilities of a CFG-combined logit row as the speculative loop uses them: the sampling
/// distribution ([`SamplingParams::probs`]), or plain softmax when greedy (so that drafters can
/// rank and relaxed greedy rules see real probabilities).
pub fn row_probs(sampling: &SamplingParams, logits: &[f32]) -> Vec<f32> {
    if sampling.is_greedy() {
        softmax(logits)
    } else {
        sampling.probs(logits)
    }
}

/// Draws an index from a probability row (need not be exactly normalised).
pub fn sample_index<R: Rng + ?Sized>(p: &[f32], rng: &mut R) -> usize {
    sample_index_at(p, rng.random::<f64>())
}

/// [`sample_index`] with its uniform `u` in `[0, 1)` given: the first index whose cumulative
/// mass (in f64, in index order) exceeds `u` times the total; the last positive index when
/// rounding leaves none.
pub fn sample_index_at(p: &[f32], u: f64) -> usize {
    sample_index_scaled(p, u, row_total(p))
}

/// The total [`sample_index_at`] scales its uniform by: the f64 sum of the row in index order
/// (`Iterator::sum`, from -0.0). In that order it is one chain of dependent additions, the
/// adder's latency per code; where [`exact_total`] shows that no addition rounds, any order
/// gives the same value, and the row is summed over independent lanes instead.
pub(crate) fn row_total(p: &[f32]) -> f64 {
    exact_total(p).unwrap_or_else(|| p.iter().map(|&x| x as f64).sum())
}

/// The sum of a non-empty row when no partial sum, in any order, rounds. Every term `+0.0` or
/// positive and finite is an integer multiple of `u = 2^(e - 150)` (`e` the smallest biased
/// exponent of a nonzero term, at least 1), and the multiples of `u` below `2^53 u` are f64
/// values: the first rounding addition, in any order, would need an exact result at or above
/// `2^53 u`, and rounding being monotone, the computed sum would stay there. A computed sum
/// below `2^53 u` thus had no rounding: it is the exact sum, and so is the sequential one
/// (whose first addition, `-0.0 + x`, is `x` for `x >= +0.0`). `None` otherwise.
fn exact_total(p: &[f32]) -> Option<f64> {
    const L: usize = 8;
    let (mut acc, mut lo, mut hi) = ([0f64; L], [u32::MAX; L], [0u32; L]);
    let mut chunks = p.chunks_exact(L);
    let mut lane = |l: usize, x: f32| {
        let b = x.to_bits();
        acc[l] += x as f64;
        hi[l] = hi[l].max(b);
        lo[l] = lo[l].min(if b == 0 { u32::MAX } else { b });
    };
    for c in &mut chunks {
        for (l, &x) in c.iter().enumerate() {
            lane(l, x);
        }
    }
    for &x in chunks.remainder() {
        lane(0, x);
    }
    let (lo, hi) = (lo.into_iter().min()?, hi.into_iter().max()?);
    // a negative term (or -0.0), an infinity or a NaN; or an empty row
    if p.is_empty() || hi >= 0x7f80_0000 {
        return None;
    }
    let s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    if lo == u32::MAX {
        return Some(s); // every term +0.0
    }
    // 2^53 u = 2^(e - 97)
    let e = (lo >> 23).max(1) as u64;
    let bound = f64::from_bits((e + 1023 - 97) << 52);
    (s < bound).then_some(s)
}

/// [`sample_index`] of a row whose [`row_total`] is known (the same draw, the same index).
pub(crate) fn sample_index_total<R: Rng + ?Sized>(p: &[f32], total: f64, rng: &mut R) -> usize {
    sample_index_scaled(p, rng.random::<f64>(), total)
}

/// [`sample_index_at`] given the row's total.
fn sample_index_scaled(p: &[f32], u: f64, total: f64) -> usize {
    let mut u = u * total;
    let mut last = 0;
    for (i, &x) in p.iter().enumerate() {
        if x > 0.0 {
            last = i;
            u -= x as f64;
            if u < 0.0 {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_crossing_token() {
        let s = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
        };
        let p = s.probs(&[1.0, 3.0, 3.0, 3.0, 0.0]);
        assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 3);
        let s = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
        };
        // probs ~ [0.665, 0.245, 0.09]: the top-1 alone crosses 0.5 and is the only one kept
        let p = s.probs(&[2.0, 1.0, 0.0]);
        assert_eq!(p, vec![1.0, 0.0, 0.0]);
        let s = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
        };
        let p = s.probs(&[2.0, 1.0, 0.0]);
        assert!(p[0] > 0.0 && p[1] > 0.0 && p[2] == 0.0);
    }

    #[test]
    fn row_total_is_the_sequential_sum_bit_for_bit() {
        use rand::rngs::StdRng;
        use rand::SeedableRng;
        let mut rng = StdRng::seed_from_u64(3);
        let mut exact = 0;
        for case in 0..400 {
            let n = [0, 1, 7, 8, 9, 1000, 16_384][case % 7];
            // logit ranges from narrow (no rounding) to wide (rounding), some zeros, and odd
            // terms (-0.0, negatives, infinities, NaN, subnormals, huge values)
            let range = [1.0f32, 10.0, 40.0, 120.0][case / 7 % 4];
            let mut p: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random::<f64>() < 0.2 {
                        0.0
                    } else {
                        (range * (rng.random::<f32>() - 1.0)).exp()
                    }
                })
                .collect();
            if n > 0 && case % 5 == 4 {
                let odd = [
                    -0.0,
                    -1e-3,
                    f32::INFINITY,
                    f32::NAN,
                    1e-42,
                    3e38,
                    2.0f32.powi(-126),
                ];
                p[rng.random_range(0..n)] = odd[case / 5 % odd.len()];
            }
            if case % 11 == 10 {
                p.iter_mut().for_each(|x| *x = 0.0);
            }
            let want: f64 = p.iter().map(|&x| x as f64).sum();
            let got = row_total(&p);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "case {case}: {got} vs {want}"
            );
            exact += exact_total(&p).is_some() as usize;
        }
        // both branches are taken
        assert!(
            (50..350).contains(&exact),
            "{exact} of 400 rows summed over lanes"
        );
    }

    #[test]
    fn greedy_is_point_mass_and_cfg_formula() {
        let p = SamplingParams::greedy().probs(&[0.1, 0.5, 0.5]);
        assert_eq!(p, vec![0.0, 1.0, 0.0]);
        assert_eq!(cfg_mix(&[2.0], &[1.0], 4.0), vec![5.0]);
    }
}
