//! Plain autoregressive decoding with CFG batch 2 (conditional rows first).
use super::model::{Target, Visibility};
use super::{cfg_rows, token_budget, DecodeStats, GenerateOptions, Output};
use crate::fused::picks;
use crate::sampling::sample_index;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// One target forward per token; image g samples with seed `opts.seed + g`.
pub fn generate_ar<T: Target>(
    target: &T,
    cond: &T::Condition,
    opts: &GenerateOptions,
) -> Result<Output> {
    let n_img = target.num_images(cond);
    let budget = token_budget(target, opts)?;
    let cfg = opts.uses_cfg().then_some(opts.cfg_scale);
    let rows = if cfg.is_some() { 2 * n_img } else { n_img };
    let cls = target.cond_len();
    let mut rngs: Vec<StdRng> = (0..n_img)
        .map(|g| StdRng::seed_from_u64(opts.seed.wrapping_add(g as u64)))
        .collect();
    let mut stats = vec![DecodeStats::default(); n_img];
    // one spare slot: the fixed-shape (CUDA graph) step stages its entry behind the filled ones
    let mut cache = target.new_cache(rows, cls + budget + 1)?;
    let t0 = Instant::now();
    let hidden = target.prefill(cond, cfg.is_some(), &mut cache)?;
    let mut logits = target.lm_head(&hidden.narrow(1, cls - 1, 1)?)?;
    let mut verify_time = t0.elapsed().as_secs_f64();
    let mut forwards = 1;
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(budget); n_img];
    let device: Device = logits.device().clone();
    // sampled tokens are drawn where the logits are (CFG, filters and the draw in two small
    // kernels on a GPU; one transfer of a token per image instead of the vocabulary rows), with
    // the same uniform per image and token as the host path; greedy decoding keeps the host
    // argmax (the reference for speculative decoding's exactness)
    let on_device = !opts.sampling.is_greedy() && picks::probs_on_device(&opts.sampling, &device);
    loop {
        if on_device {
            for (g, t) in sample_on_device(&logits, n_img, cfg, opts, &mut rngs)?
                .into_iter()
                .enumerate()
            {
                tokens[g].push(t);
            }
        } else {
            let rows_now = cfg_rows(&logits, n_img, 0, cfg)?;
            for (g, (toks, row)) in tokens.iter_mut().zip(rows_now).enumerate() {
                let p = opts.sampling.probs(&row);
                toks.push(sample_index(&p, &mut rngs[g]) as u32);
            }
        }
        if tokens[0].len() >= budget {
            break;
        }
        let last: Vec<u32> = (0..rows)
            .map(|r| *tokens[r % n_img].last().unwrap_or(&0))
            .collect();
        let ids = Tensor::from_vec(last, (rows, 1), &device)?;
        let pos = Tensor::new(&[(cls + tokens[0].len() - 1) as u32], &device)?;
        let t = Instant::now();
        let h = target.forward_tokens(&ids, &pos, &Visibility::Causal, &mut cache)?;
        logits = target.lm_head(&h)?;
        verify_time += t.elapsed().as_secs_f64();
        forwards += 1;
    }
    for s in stats.iter_mut() {
        s.target_forwards = forwards;
        s.accepted_per_step = vec![1; budget];
        s.time_verify = verify_time;
        s.finish(&[]);
    }
    Ok(Output { tokens, stats })
}

/// One token per image drawn from logits `[rows, 1, V]` by the picks ops (see
/// [`crate::fused::picks`]): CFG-combined probabilities, then one draw per image with a uniform
/// from the image's stream, which is [`sample_index`] of the host row.
fn sample_on_device(
    logits: &Tensor,
    n_img: usize,
    cfg: Option<f32>,
    opts: &GenerateOptions,
    rngs: &mut [StdRng],
) -> Result<Vec<u32>> {
    let probs = picks::draft_probs_cfg(logits, n_img, cfg, &opts.sampling)?;
    let us: Vec<f64> = rngs.iter_mut().map(|r| r.random::<f64>()).collect();
    let us = Tensor::from_vec(us, (n_img, 1), logits.device())?;
    picks::picks_to_host(&picks::draw(&probs, &us)?)?
        .into_iter()
        .map(|row| match row.first() {
            Some(&(token, _)) => Ok(token as u32),
            None => Err(Error::invalid(
                "sampling",
                "a probability row had no mass (internal error)",
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    #[test]
    fn device_draws_equal_host_draws_from_the_same_streams() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 2.0, (6, 1, 50), &dev)?;
        for (cfg, n_img) in [(Some(3.0f32), 3), (None, 6)] {
            for sampling in [
                SamplingParams::default(),
                SamplingParams {
                    temperature: 0.7,
                    top_k: 5,
                    top_p: 0.9,
                },
            ] {
                let opts = GenerateOptions::new().with_sampling(sampling);
                let seeds = || -> Vec<StdRng> {
                    (0..n_img)
                        .map(|g| StdRng::seed_from_u64(40 + g as u64))
                        .collect()
                };
                let (mut a, mut b) = (seeds(), seeds());
                for _ in 0..20 {
                    let dev_tokens = sample_on_device(&logits, n_img, cfg, &opts, &mut a)?;
                    let host: Vec<u32> = cfg_rows(&logits, n_img, 0, cfg)?
                        .iter()
                        .zip(b.iter_mut())
                        .map(|(row, r)| sample_index(&sampling.probs(row), r) as u32)
                        .collect();
                    assert_eq!(dev_tokens, host, "{cfg:?} {sampling:?}");
                }
            }
        }
        Ok(())
    }
}
