//! Greedy speculative decoding must reproduce greedy AR token for token, with any drafter and
//! any tree; bad options give clear errors.
mod decode_common;

use decode_common::{MockDrafter, MockLm};
use lantern::decode::{generate, AcceptConfig, Decoding, GenerateOptions, TreeSpec};
use lantern::sampling::SamplingParams;

fn spec(tree: &str) -> Decoding {
    Decoding::Speculative {
        tree: TreeSpec::parse(tree).unwrap(),
        accept: AcceptConfig::default(),
        neighbors: None,
    }
}

fn greedy(cfg: f32) -> GenerateOptions {
    GenerateOptions::new()
        .with_cfg_scale(cfg)
        .with_sampling(SamplingParams::greedy())
        .with_seed(3)
}

const TREES: [&str; 6] = [
    "dynamic",
    "dynamic:6:2:3",
    "naive_extend_57",
    "mc_sim_7b_63",
    "chain:3",
    "[[0],[1],[0,0],[0,1],[1,0]]",
];

#[test]
fn greedy_speculative_equals_greedy_ar() {
    let lm = MockLm::new(16, 12, 14, 4, 1);
    let classes = vec![0, 1, 2];
    let drafters: [(&str, MockDrafter); 2] = [
        ("self", lm.self_drafter()),
        ("random", lm.random_drafter(9)),
    ];
    for cfg in [2.0, 1.0] {
        let ar = generate::<_, MockDrafter>(&lm, None, &classes, &greedy(cfg)).unwrap();
        assert_eq!(ar.tokens.len(), 3);
        assert!(ar.tokens.iter().all(|t| t.len() == 14));
        assert_eq!(ar.stats[0].target_forwards, 14);
        assert_eq!(ar.stats[0].tau, 1.0);
        // different classes give different images
        assert_ne!(ar.tokens[0], ar.tokens[1]);
        for (name, d) in &drafters {
            for tree in TREES {
                let out = generate(
                    &lm,
                    Some(d),
                    &classes,
                    &greedy(cfg).with_decoding(spec(tree)),
                )
                .unwrap();
                assert_eq!(
                    out.tokens, ar.tokens,
                    "drafter {name}, tree {tree}, cfg {cfg}"
                );
                let s = &out.stats[0];
                assert_eq!(
                    s.accepted_per_step.iter().sum::<usize>(),
                    13,
                    "{name} {tree}"
                );
                assert_eq!(s.target_forwards, 1 + s.accepted_per_step.len());
                if *name == "self" && (tree == "dynamic" || tree == "naive_extend_57") {
                    // a perfect drafter gets whole 5-draft paths + bonus accepted (last step cut short)
                    assert!(s.tau > 4.0, "{tree}: tau {}", s.tau);
                }
            }
        }
    }
}

#[test]
fn single_image_and_budget_stop() {
    let lm = MockLm::new(16, 12, 14, 4, 2);
    let d = lm.self_drafter();
    let opts = greedy(2.0).with_max_tokens(9);
    let ar = generate::<_, MockDrafter>(&lm, None, &vec![3], &opts).unwrap();
    let sd = generate(
        &lm,
        Some(&d),
        &vec![3],
        &opts.clone().with_decoding(spec("dynamic")),
    )
    .unwrap();
    assert_eq!(ar.tokens[0].len(), 9);
    assert_eq!(sd.tokens, ar.tokens);
    // first token from the prefill, then 5 drafts + bonus, then the budget cuts the path at 2
    assert_eq!(sd.stats[0].accepted_per_step, vec![6, 2]);
    let json = serde_json::to_string(&sd.stats[0]).unwrap();
    assert!(json.contains("\"tau\":4.0"), "{json}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    for bad in [
        "[[0],[0,1]]",
        "[[0],",
        "[]",
        "[[12]]",
        "dynamic:0:4:10",
        "dynamic:99999:4:10",
        "chain:0",
        "what",
    ] {
        let e = TreeSpec::parse(bad).unwrap_err().to_string();
        assert!(e.starts_with("invalid"), "{bad}: {e}");
        assert!(!e.contains('\n'), "{bad}: {e}");
    }
    let lm = MockLm::new(8, 8, 6, 2, 3);
    let e = generate::<_, MockDrafter>(
        &lm,
        None,
        &vec![0],
        &greedy(2.0).with_decoding(spec("chain:2")),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs a drafter"), "{e}");
    let e = generate::<_, MockDrafter>(&lm, None, &vec![0], &greedy(2.0).with_max_tokens(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("max tokens"), "{e}");
    let bad_temp = SamplingParams {
        temperature: -1.0,
        top_k: 0,
        top_p: 1.0,
    };
    assert!(
        generate::<_, MockDrafter>(&lm, None, &vec![0], &greedy(2.0).with_sampling(bad_temp))
            .is_err()
    );
}

/// A drafter that agrees with the target only in part (its token table is perturbed), so
/// images accept paths of different lengths.
fn partial_drafter(lm: &MockLm, noise: f64) -> MockDrafter {
    let other = lm.random_drafter(4);
    MockDrafter {
        emb: (&lm.emb + (other.emb * noise).unwrap()).unwrap(),
        pos: lm.pos.clone(),
        feat_scale: 1.0,
    }
}

/// What must not depend on the batch: tokens, acceptances, forwards, TVD.
fn per_image(out: &lantern::decode::Output, g: usize) -> (Vec<u32>, Vec<usize>, usize, f64, f64) {
    let s = &out.stats[g];
    (
        out.tokens[g].clone(),
        s.accepted_per_step.clone(),
        s.target_forwards,
        s.tau,
        s.tvd_max,
    )
}

#[test]
fn batched_images_advance_independently() {
    let lm = MockLm::new(16, 12, 24, 4, 1);
    let classes = vec![0, 1, 2, 3, 1];
    let d = partial_drafter(&lm, 0.5);
    let sampled = GenerateOptions::new()
        .with_cfg_scale(2.0)
        .with_sampling(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        })
        .with_seed(21);
    for tree in ["dynamic", "[[0],[1],[0,0],[0,1],[1,0],[0,0,0],[0,0,0,0]]"] {
        for (mode, base) in [("greedy", greedy(2.0)), ("sampled", sampled.clone())] {
            let opts = base.clone().with_decoding(spec(tree));
            let batch = generate(&lm, Some(&d), &classes, &opts).unwrap();
            for (g, &c) in classes.iter().enumerate() {
                let one = opts.clone().with_seed(opts.seed + g as u64);
                let single = generate(&lm, Some(&d), &vec![c], &one).unwrap();
                assert_eq!(
                    per_image(&batch, g),
                    per_image(&single, 0),
                    "{mode} {tree} image {g}"
                );
            }
            let steps: Vec<&Vec<usize>> =
                batch.stats.iter().map(|s| &s.accepted_per_step).collect();
            println!("{mode} {tree}: {steps:?}");
            assert!(
                steps.iter().any(|s| s != &steps[0]),
                "{mode} {tree}: images advanced in lock step {steps:?}"
            );
            if mode == "greedy" {
                let ar = generate::<_, MockDrafter>(&lm, None, &classes, &base).unwrap();
                assert_eq!(batch.tokens, ar.tokens, "{tree}");
            }
        }
    }
}
