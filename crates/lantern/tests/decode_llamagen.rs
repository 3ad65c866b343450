//! The decoding loops on the real tiny LlamaGen fixtures (`tests/fixtures/gpt`, see
//! `gpt_golden.rs`): AR reproduces the reference greedy tokens, greedy speculative decoding
//! reproduces greedy AR with any drafter and tree (c2i with CFG, t2i with caption padding),
//! LANTERN runs within its TVD budget, mismatched drafters give clear errors.
//! Run: `cargo test -p lantern --test decode_llamagen`
mod common;

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{c2i, expected, fixture_drafter, t2i};
use lantern::accept::{Metric, Neighbors};
use lantern::decode::llamagen::generate;
use lantern::decode::{AcceptConfig, Decoding, GenerateOptions, Relaxation, Residual, TreeSpec};
use lantern::models::drafter::{Drafter, DrafterConfig};
use lantern::models::llamagen::{Condition, LlamaGen};
use lantern::sampling::SamplingParams;

/// A freshly initialised drafter (VarMap init).
fn random_drafter(input_type: &str, hidden: usize, vocab: usize) -> Result<Drafter> {
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = DrafterConfig::from_hf_value(&serde_json::json!({
        "hidden_size": hidden, "intermediate_size": 64, "num_attention_heads": 2,
        "vocab_size": vocab, "input_type": input_type, "block_size": 16
    }))
    .map_err(anyhow::Error::msg)?;
    Ok(Drafter::load(vb, &cfg)?)
}

/// Two captions: the fixture's, and a shorter one (20 valid rows) with other features.
fn captions() -> Result<Condition> {
    let exp = expected()?;
    let f0 = exp["t2i_features"].i(0..1)?;
    let v0 = exp["t2i_valid"].i(0..1)?;
    let mut v1 = vec![0f32; 100];
    v1.extend([1f32; 20]);
    let v1 = Tensor::from_vec(v1, (1, 120), &Device::Cpu)?;
    let f1 = (&f0 * -0.7)?.broadcast_mul(&v1.unsqueeze(2)?)?;
    let f0 = f0.broadcast_mul(&v0.unsqueeze(2)?)?;
    Ok(Condition::Captions {
        features: Tensor::cat(&[f0, f1], 0)?,
        mask: Tensor::cat(&[v0, v1], 0)?,
    })
}

fn greedy(cfg: f32) -> GenerateOptions {
    GenerateOptions::new()
        .with_cfg_scale(cfg)
        .with_sampling(SamplingParams::greedy())
        .with_seed(5)
}

fn spec(tree: &str, accept: AcceptConfig, nb: Option<Arc<Neighbors>>) -> Result<Decoding> {
    Ok(Decoding::Speculative {
        tree: TreeSpec::parse(tree)?,
        accept,
        neighbors: nb,
    })
}

#[test]
fn ar_reproduces_reference_greedy_tokens() -> Result<()> {
    let exp = expected()?;
    let m = c2i()?;
    let out = generate(&m, None, &Condition::Classes(vec![7]), &greedy(4.0))?;
    let want: Vec<u32> = exp["c2i_greedy_cfg4"].to_dtype(DType::U32)?.to_vec1()?;
    assert_eq!(out.tokens[0], want);
    // t2i: the caption padding must be masked in every single-token step too.
    let m = t2i()?;
    let cond = Condition::Captions {
        features: exp["t2i_features"].i(0..1)?,
        mask: exp["t2i_valid"].i(0..1)?,
    };
    let out = generate(&m, None, &cond, &greedy(4.0))?;
    let want: Vec<u32> = exp["t2i_greedy_cfg4"].to_dtype(DType::U32)?.to_vec1()?;
    assert_eq!(out.tokens[0], want);
    assert_eq!(out.stats[0].target_forwards, 16);
    Ok(())
}

const TREES: [&str; 4] = ["dynamic", "dynamic:12:3:4", "naive_extend_57", "chain:3"];

fn check_greedy_equal(m: &LlamaGen, cond: &Condition, drafters: &[(&str, Drafter)]) -> Result<()> {
    for cfg in [4.0, 1.0] {
        let ar = generate(m, None, cond, &greedy(cfg))?;
        assert!(ar.tokens.iter().all(|t| t.len() == 16));
        assert_ne!(ar.tokens[0], ar.tokens[1], "images must differ");
        for (name, d) in drafters {
            for tree in TREES {
                if cfg == 1.0 && tree != "dynamic" {
                    continue;
                }
                let opts = greedy(cfg).with_decoding(spec(tree, AcceptConfig::default(), None)?);
                let out = generate(m, Some(d), cond, &opts)?;
                assert_eq!(
                    out.tokens, ar.tokens,
                    "drafter {name}, tree {tree}, cfg {cfg}"
                );
                let s = &out.stats[0];
                assert_eq!(
                    s.accepted_per_step.iter().sum::<usize>(),
                    15,
                    "{name} {tree}"
                );
                assert_eq!(s.target_forwards, 1 + s.accepted_per_step.len());
                assert!(s.tau >= 1.0 && s.target_forwards <= 16, "{name} {tree}");
                assert!(s.drafter_forwards > s.accepted_per_step.len());
                assert_eq!(s.tvd_max, 0.0);
            }
        }
    }
    Ok(())
}

#[test]
fn c2i_greedy_speculative_equals_greedy_ar() -> Result<()> {
    let m = c2i()?;
    let drafters = [
        ("fixture", fixture_drafter(true)?),
        ("random", random_drafter("c2i", 32, 64)?),
    ];
    check_greedy_equal(&m, &Condition::Classes(vec![7, 3]), &drafters)
}

#[test]
fn t2i_greedy_speculative_equals_greedy_ar() -> Result<()> {
    let m = t2i()?;
    let drafters = [
        ("fixture", fixture_drafter(false)?),
        ("random", random_drafter("t2i", 32, 64)?),
    ];
    check_greedy_equal(&m, &captions()?, &drafters)
}

/// Latent neighbours of a fixed pseudo-random 64 x 8 codebook.
fn neighbors() -> Result<Arc<Neighbors>> {
    let cb: Vec<f32> = (0..64 * 8)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0)
        .collect();
    Ok(Arc::new(Neighbors::build(&cb, 64, 8, 8, Metric::L2)?))
}

#[test]
fn lantern_runs_within_its_tvd_budget() -> Result<()> {
    let m = t2i()?;
    let d = fixture_drafter(false)?;
    let cond = captions()?;
    let delta = 0.1;
    let lantern = AcceptConfig {
        relaxation: Relaxation::Lantern { k: 4, delta },
        residual: Residual::Standard,
        greedy: false,
    };
    let nb = neighbors()?;
    let sampled = GenerateOptions::new().with_seed(11);
    for (name, base) in [("greedy", greedy(4.0)), ("sampled", sampled)] {
        let opts = base.with_decoding(spec("dynamic", lantern, Some(nb.clone()))?);
        let out = generate(&m, Some(&d), &cond, &opts)?;
        assert!(out
            .tokens
            .iter()
            .all(|t| t.len() == 16 && t.iter().all(|&x| x < 64)));
        for s in &out.stats {
            assert!(s.tvd_max <= delta as f64 + 1e-5, "{name}: {}", s.tvd_max);
            assert!(s.tvd_mean <= s.tvd_max);
            assert!(s.tau >= 1.0);
            println!(
                "{name}: tau {:.2} tvd mean {:.4} max {:.4}",
                s.tau, s.tvd_mean, s.tvd_max
            );
        }
        if name == "sampled" {
            // The relaxation is engaged: some position moved mass.
            let most = out.stats.iter().map(|s| s.tvd_max).fold(0.0, f64::max);
            assert!(most > 1e-3, "no mass absorbed ({most})");
            // Exact acceptance with the same drafts reports no distortion.
            let exact = GenerateOptions::new().with_seed(11).with_decoding(spec(
                "dynamic",
                AcceptConfig::default(),
                None,
            )?);
            let ex = generate(&m, Some(&d), &cond, &exact)?;
            for s in &ex.stats {
                assert!(s.tvd_max < 1e-5, "exact rule reports TVD {}", s.tvd_max);
            }
        }
    }
    // Static tree, sampled drafts (without replacement): completes; no delta guarantee there.
    let opts = GenerateOptions::new().with_seed(2).with_decoding(spec(
        "naive_extend_57",
        lantern,
        Some(nb.clone()),
    )?);
    let out = generate(&m, Some(&d), &cond, &opts)?;
    assert!(out.tokens.iter().all(|t| t.len() == 16));
    assert!(out.stats.iter().all(|s| s.tvd_max <= 1.0 + 1e-5));
    // LANTERN without a neighbour table is a clear error.
    let opts = greedy(4.0).with_decoding(spec("dynamic", lantern, None)?);
    let err = generate(&m, Some(&d), &cond, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("neighbour table"), "{err}");
    Ok(())
}

#[test]
fn mismatched_drafters_are_clear_errors() -> Result<()> {
    let m = c2i()?;
    let cond = Condition::Classes(vec![1]);
    let opts = greedy(4.0).with_decoding(spec("dynamic", AcceptConfig::default(), None)?);
    let wide = random_drafter("c2i", 16, 64)?;
    let err = generate(&m, Some(&wide), &cond, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("width"), "{err}");
    let vocab = random_drafter("c2i", 32, 32)?;
    let err = generate(&m, Some(&vocab), &cond, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab"), "{err}");
    // A t2i drafter (RoPE offset 119) on a class model.
    let err = generate(&m, Some(&fixture_drafter(false)?), &cond, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("RoPE offset"), "{err}");
    // A t2i condition on a class model.
    let err = generate(&m, None, &captions()?, &greedy(4.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pass class ids"), "{err}");
    Ok(())
}

/// Image g of `cond` alone.
fn single(cond: &Condition, g: usize) -> Result<Condition> {
    Ok(match cond {
        Condition::Classes(ids) => Condition::Classes(vec![ids[g]]),
        Condition::Captions { features, mask } => Condition::Captions {
            features: features.i(g..g + 1)?,
            mask: mask.i(g..g + 1)?,
        },
    })
}

/// Batched images advance independently: every image's tokens, acceptances and forwards equal
/// its single-image run with seed `seed + g` (greedy and sampled), and the images' accepted
/// lengths differ (no lock step). Greedy batches also equal greedy AR.
fn check_independent(m: &LlamaGen, d: &Drafter, cond: &Condition, trees: &[&str]) -> Result<()> {
    let n = match cond {
        Condition::Classes(ids) => ids.len(),
        Condition::Captions { features, .. } => features.dim(0)?,
    };
    let sampled = GenerateOptions::new().with_cfg_scale(4.0).with_seed(13);
    for &tree in trees {
        for (mode, base) in [("greedy", greedy(4.0)), ("sampled", sampled.clone())] {
            let opts = base
                .clone()
                .with_decoding(spec(tree, AcceptConfig::default(), None)?);
            let batch = generate(m, Some(d), cond, &opts)?;
            for g in 0..n {
                let one = opts.clone().with_seed(opts.seed + g as u64);
                let s = generate(m, Some(d), &single(cond, g)?, &one)?;
                assert_eq!(batch.tokens[g], s.tokens[0], "{mode} {tree} image {g}");
                let (b, s) = (&batch.stats[g], &s.stats[0]);
                assert_eq!(
                    b.accepted_per_step, s.accepted_per_step,
                    "{mode} {tree} {g}"
                );
                assert_eq!(b.target_forwards, s.target_forwards, "{mode} {tree} {g}");
                assert_eq!(b.tau, s.tau, "{mode} {tree} {g}");
            }
            let steps: Vec<&Vec<usize>> =
                batch.stats.iter().map(|s| &s.accepted_per_step).collect();
            println!("{mode} {tree}: {steps:?}");
            assert!(
                steps.iter().any(|s| s != &steps[0]),
                "{mode} {tree}: lock step {steps:?}"
            );
            if mode == "greedy" {
                assert_eq!(batch.tokens, generate(m, None, cond, &base)?.tokens);
            }
        }
    }
    Ok(())
}

#[test]
fn batched_images_advance_independently() -> Result<()> {
    let m = c2i()?;
    let d = fixture_drafter(true)?;
    check_independent(
        &m,
        &d,
        &Condition::Classes(vec![7, 3, 1, 5]),
        &["dynamic", "naive_extend_57"],
    )?;
    let m = t2i()?;
    let d = fixture_drafter(false)?;
    check_independent(&m, &d, &captions()?, &["dynamic"])
}

/// A target, its drafter, a batch condition and the decoding runs to compare.
type PathCase = (LlamaGen, Drafter, Condition, Vec<GenerateOptions>);

/// The cases the alternative forward paths must reproduce token for token: c2i with CFG and
/// three batched classes, t2i with caption padding; AR, SD on dynamic and static trees, and
/// sampled LANTERN++ on a chain and on a static tree whose nodes run out of mass.
fn path_cases() -> Result<Vec<PathCase>> {
    let lpp = AcceptConfig {
        relaxation: Relaxation::LanternPP { k: 4, lambda: 2.0 },
        ..AcceptConfig::default()
    };
    let runs = vec![
        greedy(4.0),
        greedy(4.0).with_decoding(spec("dynamic", AcceptConfig::default(), None)?),
        greedy(4.0).with_decoding(spec("naive_extend_57", AcceptConfig::default(), None)?),
        greedy(4.0)
            .with_sampling(SamplingParams::default())
            .with_decoding(spec("chain:3", lpp, Some(neighbors()?))?),
        // top-k 3 leaves mass for 3 of the root's 10 children: drafted trees drop nodes (the
        // device-built verification keeps their columns, acceptance must skip them)
        greedy(4.0)
            .with_sampling(SamplingParams {
                temperature: 1.0,
                top_k: 3,
                top_p: 1.0,
            })
            .with_decoding(spec("naive_extend_57", lpp, Some(neighbors()?))?),
    ];
    Ok(vec![
        (
            c2i()?,
            fixture_drafter(true)?,
            Condition::Classes(vec![7, 3, 1]),
            runs.clone(),
        ),
        (t2i()?, fixture_drafter(false)?, captions()?, runs),
    ])
}

/// The fixed-shape path that GPUs replay as CUDA graphs (forced here on the CPU) gives the
/// tokens of the ordinary forward: AR and speculative decoding with dynamic and static trees,
/// greedy and sampled LANTERN++, c2i and t2i (caption padding in the full-cache masks), with
/// batched images advancing independently (holes in the masks).
#[test]
fn fixed_shape_path_gives_identical_tokens() -> Result<()> {
    use lantern::decode::graph_step::force_fixed_shape;
    for (m, d, cond, runs) in &path_cases()? {
        for opts in runs {
            force_fixed_shape(false);
            let want = generate(m, Some(d), cond, opts)?;
            force_fixed_shape(true);
            let got = generate(m, Some(d), cond, opts);
            force_fixed_shape(false);
            let got = got?;
            assert_eq!(got.tokens, want.tokens, "{:?}", opts.decoding);
            let steps = |o: &lantern::decode::Output| -> Vec<Vec<usize>> {
                o.stats
                    .iter()
                    .map(|s| s.accepted_per_step.clone())
                    .collect()
            };
            assert_eq!(steps(&got), steps(&want));
        }
    }
    Ok(())
}

/// The fused kernels' path (run here by their CPU versions) gives the tokens of the op-by-op
/// reference: AR and speculative decoding (dynamic and static trees, greedy and sampled
/// LANTERN++), c2i with CFG and t2i with caption padding and grouped-query attention, with and
/// without the fixed-shape steps that GPUs capture as graphs.
#[test]
fn fused_path_gives_identical_tokens() -> Result<()> {
    use lantern::decode::graph_step::force_fixed_shape;
    use lantern::fused::force_on_cpu;
    for (m, d, cond, runs) in &path_cases()? {
        for opts in runs {
            let want = generate(m, Some(d), cond, opts)?;
            for fixed in [false, true] {
                force_fixed_shape(fixed);
                force_on_cpu(true);
                let got = generate(m, Some(d), cond, opts);
                force_on_cpu(false);
                force_fixed_shape(false);
                let got = got?;
                assert_eq!(
                    got.tokens, want.tokens,
                    "fixed {fixed}: {:?}",
                    opts.decoding
                );
            }
        }
    }
    Ok(())
}
