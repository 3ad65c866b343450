//! Plain autoregressive decoding with CFG batch 2 (conditional rows first).
use super::model::{Target, Visibility};
use super::{cfg_rows, token_budget, DecodeStats, GenerateOptions, Output};
use crate::sampling::sample_index;
use crate::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
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
    loop {
        let rows_now = cfg_rows(&logits, n_img, 0, cfg)?;
        for (g, (toks, row)) in tokens.iter_mut().zip(rows_now).enumerate() {
            let p = opts.sampling.probs(&row);
            toks.push(sample_index(&p, &mut rngs[g]) as u32);
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
