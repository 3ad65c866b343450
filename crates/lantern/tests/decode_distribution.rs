//! Speculative sampling must be distribution-exact: on a vocabulary of 4 and 3 tokens (64
//! sequences) the empirical distribution of many speculative samples (bad drafter, dynamic and
//! static trees, batches whose images advance independently) must match the exact AR
//! distribution, computed by enumeration. Pearson chi-square at alpha = 0.001, fixed seeds.
mod decode_common;

use candle_core::{Device, Tensor};
use decode_common::{MockDrafter, MockLm};
use lantern::decode::model::{Target, Visibility};
use lantern::decode::{generate, AcceptConfig, Decoding, GenerateOptions, TreeSpec};
use lantern::sampling::{cfg_mix, SamplingParams};

const V: usize = 4;
const CLASS: u32 = 1;
const CFG: f32 = 1.5;

fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 3,
        top_p: 1.0,
    }
}

/// p(t | prefix) for the class, from the target with CFG and the sampling filters.
fn next_probs(lm: &MockLm, prefix: &[u32]) -> Vec<f32> {
    let mut cache = lm.new_cache(2, 8).unwrap();
    let h = lm.prefill(&vec![CLASS], true, &mut cache).unwrap();
    let h = if prefix.is_empty() {
        h
    } else {
        let ids: Vec<u32> = prefix.iter().chain(prefix).copied().collect();
        let ids = Tensor::from_vec(ids, (2, prefix.len()), &Device::Cpu).unwrap();
        let pos: Vec<u32> = (1..=prefix.len() as u32).collect();
        let pos = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
        lm.forward_tokens(&ids, &pos, &Visibility::Causal, &mut cache)
            .unwrap()
    };
    let s = h.dim(1).unwrap();
    let l = lm.lm_head(&h.narrow(1, s - 1, 1).unwrap()).unwrap();
    let l: Vec<Vec<Vec<f32>>> = l.to_vec3().unwrap();
    sampling().probs(&cfg_mix(&l[0][0], &l[1][0], CFG))
}

fn exact(lm: &MockLm) -> Vec<f64> {
    let mut out = vec![0.0; V * V * V];
    let p0 = next_probs(lm, &[]);
    for a in 0..V {
        let p1 = next_probs(lm, &[a as u32]);
        for b in 0..V {
            let p2 = next_probs(lm, &[a as u32, b as u32]);
            for c in 0..V {
                out[a * V * V + b * V + c] = p0[a] as f64 * p1[b] as f64 * p2[c] as f64;
            }
        }
    }
    out
}

/// Chi-square statistic (cells with expected count < 5 pooled) and degrees of freedom.
fn chi_square(expected_p: &[f64], counts: &[usize], n: usize) -> (f64, usize) {
    let (mut stat, mut cells) = (0.0, 0);
    let (mut pool_e, mut pool_o) = (0.0, 0.0);
    for (&p, &c) in expected_p.iter().zip(counts) {
        let e = p * n as f64;
        if e < 5.0 {
            pool_e += e;
            pool_o += c as f64;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        cells += 1;
    }
    (stat, cells - 1)
}

/// Upper alpha = 0.001 quantile of chi-square (Wilson-Hilferty).
fn critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

fn run(lm: &MockLm, drafter: &MockDrafter, tree: &str, seed: u64) -> (f64, f64, usize) {
    let exact = exact(lm);
    assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    let (batch, calls) = (150, 40);
    let mut counts = vec![0usize; V * V * V];
    let mut steps = 0;
    for call in 0..calls {
        let opts = GenerateOptions::new()
            .with_cfg_scale(CFG)
            .with_sampling(sampling())
            .with_seed(seed + (call * batch) as u64)
            .with_decoding(Decoding::Speculative {
                tree: TreeSpec::parse(tree).unwrap(),
                accept: AcceptConfig::default(),
                neighbors: None,
            });
        let out = generate(lm, Some(drafter), &vec![CLASS; batch], &opts).unwrap();
        steps += out.stats[0].accepted_per_step.len();
        for t in &out.tokens {
            counts[t[0] as usize * V * V + t[1] as usize * V + t[2] as usize] += 1;
        }
    }
    let (stat, df) = chi_square(&exact, &counts, batch * calls);
    (stat, critical(df), steps)
}

#[test]
fn speculative_samples_follow_the_exact_ar_distribution() {
    let lm = MockLm::new(V, 6, 3, 2, 11);
    let bad = lm.random_drafter(5);
    let good = lm.self_drafter();
    for (name, d) in [("bad", &bad), ("good", &good)] {
        for tree in [
            "dynamic:5:2:2",
            "[[0],[1],[2],[0,0],[0,1],[1,0]]",
            "chain:2",
        ] {
            let (stat, crit, steps) = run(&lm, d, tree, 1000);
            assert!(
                stat < crit,
                "drafter {name}, tree {tree}: chi-square {stat:.1} >= critical {crit:.1}"
            );
            // 2 tokens after the prefill need 1 or 2 verification steps per call
            assert!((40..=80).contains(&steps), "{steps}");
        }
    }
}
