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
    let total: f64 = p.iter().map(|&x| x as f64).sum();
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
    fn greedy_is_point_mass_and_cfg_formula() {
        let p = SamplingParams::greedy().probs(&[0.1, 0.5, 0.5]);
        assert_eq!(p, vec![0.0, 1.0, 0.0]);
        assert_eq!(cfg_mix(&[2.0], &[1.0], 4.0), vec![5.0]);
    }
}
