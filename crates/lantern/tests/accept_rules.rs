//! Property tests of the acceptance rules over many random distributions and neighbour tables,
//! and worked greedy examples with known answers.
use lantern::accept::rules::tvd;
use lantern::accept::{
    absorbed_mass, accept_tree, greedy_accepts, sibling_chain, AcceptConfig, Metric, Neighbors,
    Relaxation, Residual,
};
use lantern::decode::tree::{DraftKind, DraftTree};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// A random distribution: heavy-tailed weights with about a quarter of the entries zero.
fn random_dist(rng: &mut StdRng, v: usize) -> Vec<f32> {
    let mut p: Vec<f32> = (0..v)
        .map(|_| {
            if rng.random::<f32>() < 0.25 {
                0.0
            } else {
                rng.random::<f32>().powi(3)
            }
        })
        .collect();
    let i = rng.random_range(0..v);
    p[i] += 0.01;
    let s: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= s);
    p
}

fn random_table(rng: &mut StdRng, v: usize) -> Neighbors {
    let cb: Vec<f32> = (0..v * 3).map(|_| rng.random::<f32>()).collect();
    Neighbors::build(&cb, v, 3, v - 1, Metric::L2).unwrap()
}

/// p with A(x) moved onto x: the relaxed target LANTERN accepts against.
fn relaxed(p: &[f32], x: u32, nb: &Neighbors, len: usize) -> Vec<f32> {
    let mut q = p.to_vec();
    for j in 0..len {
        let y = nb.neighbor(x, j) as usize;
        q[x as usize] += q[y];
        q[y] = 0.0;
    }
    q
}

#[test]
fn relaxed_target_within_delta_and_lambda_cap() {
    let mut rng = StdRng::seed_from_u64(10);
    for _ in 0..300 {
        let v = rng.random_range(4..40);
        let nb = random_table(&mut rng, v);
        for _ in 0..10 {
            let p = random_dist(&mut rng, v);
            let x = rng.random_range(0..v) as u32;
            let k = rng.random_range(1..v);
            let delta = rng.random::<f32>() * 0.5;
            let r = Relaxation::Lantern { k, delta };
            let (abs, len) = absorbed_mass(&p, x, &nb, &r);
            assert!(abs <= delta + 1e-6 && len <= k);
            let pr = relaxed(&p, x, &nb, len);
            assert!(tvd(&p, &pr) <= delta + 1e-6);
            assert!((tvd(&p, &pr) - abs).abs() < 1e-5);
            // maximal prefix: one more neighbour would break the budget
            if len < k {
                let next = p[nb.neighbor(x, len) as usize];
                assert!(abs + next > delta - 1e-6, "prefix not maximal");
            }
            let lambda = 1.0 + rng.random::<f32>() * 10.0;
            let r = Relaxation::LanternPP { k, lambda };
            let (abs, _) = absorbed_mass(&p, x, &nb, &r);
            let px = p[x as usize];
            assert!(px + abs <= lambda * px + 1e-6);
        }
    }
}

#[test]
fn acceptance_non_decreasing_in_k_delta_lambda() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..300 {
        let v = rng.random_range(4..30);
        let nb = random_table(&mut rng, v);
        let p = random_dist(&mut rng, v);
        let x = rng.random_range(0..v) as u32;
        let mut last = 0.0f32;
        for k in 1..v {
            let (a, _) = absorbed_mass(&p, x, &nb, &Relaxation::Lantern { k, delta: 0.2 });
            assert!(a >= last);
            last = a;
        }
        let k = rng.random_range(1..v);
        let (mut last_d, mut last_l) = (0.0f32, 0.0f32);
        for i in 0..=20 {
            let delta = i as f32 / 20.0;
            let (a, _) = absorbed_mass(&p, x, &nb, &Relaxation::Lantern { k, delta });
            assert!(a >= last_d);
            last_d = a;
            let lambda = 1.0 + i as f32;
            let (a, _) = absorbed_mass(&p, x, &nb, &Relaxation::LanternPP { k, lambda });
            assert!(a >= last_l);
            last_l = a;
        }
    }
}

/// A random tree: up to 3 levels, up to 4 children per expanded node, distinct sibling tokens.
fn random_tree(rng: &mut StdRng, v: usize, kind: DraftKind) -> DraftTree {
    let mut t = DraftTree {
        tokens: vec![rng.random_range(0..v) as u32],
        parents: vec![0],
        depths: vec![0],
        q: vec![1.0],
        q_dists: vec![None],
        kind,
    };
    let mut frontier = vec![0usize];
    for _ in 0..3 {
        let mut next = Vec::new();
        for &n in &frontier {
            let m = rng.random_range(1..=4usize.min(v));
            let qd = random_dist(rng, v);
            let mut left = qd.clone();
            for _ in 0..m {
                // draw without replacement from qd; q = conditional probability
                let s: f32 = left.iter().sum();
                if s <= 0.0 {
                    break;
                }
                let x = lantern::sampling::sample_index(&left, rng);
                t.tokens.push(x as u32);
                t.parents.push(n);
                t.depths.push(t.depths[n] + 1);
                t.q.push(if kind == DraftKind::Deterministic {
                    1.0
                } else {
                    left[x] / s
                });
                t.q_dists.push(None);
                left[x] = 0.0;
                next.push(t.len() - 1);
            }
            if kind == DraftKind::WithoutReplacement {
                t.q_dists[n] = Some(qd.into());
            }
        }
        frontier = next;
    }
    t
}

#[test]
fn zero_budget_makes_exactly_the_exact_decisions() {
    let mut rng = StdRng::seed_from_u64(12);
    for case in 0..400 {
        let v = rng.random_range(3..25);
        let nb = random_table(&mut rng, v);
        let kind = if case % 2 == 0 {
            DraftKind::Deterministic
        } else {
            DraftKind::WithoutReplacement
        };
        let tree = random_tree(&mut rng, v, kind);
        let rows: Vec<Vec<f32>> = (0..tree.len()).map(|_| random_dist(&mut rng, v)).collect();
        let k = rng.random_range(1..v);
        let seed = rng.random::<u64>();
        for greedy in [false, true] {
            for residual in [Residual::Standard, Residual::Official] {
                let run = |relaxation| {
                    let cfg = AcceptConfig {
                        relaxation,
                        residual,
                        greedy,
                    };
                    let mut r = StdRng::seed_from_u64(seed);
                    let d = accept_tree(&tree, &mut rows.clone(), &cfg, Some(&nb), &mut r).unwrap();
                    (d.accepted, d.next_token, r.next_u64())
                };
                let exact = run(Relaxation::Exact);
                assert_eq!(
                    exact,
                    run(Relaxation::Lantern { k, delta: 0.0 }),
                    "case {case}"
                );
                assert_eq!(
                    exact,
                    run(Relaxation::LanternPP { k, lambda: 1.0 }),
                    "case {case}"
                );
            }
        }
    }
}

#[test]
fn effective_distribution_respects_the_bounds() {
    let mut rng = StdRng::seed_from_u64(13);
    for case in 0..600 {
        let v = rng.random_range(3..30);
        let nb = random_table(&mut rng, v);
        let kind = if case % 2 == 0 {
            DraftKind::Deterministic
        } else {
            DraftKind::WithoutReplacement
        };
        let tree = random_tree(&mut rng, v, kind);
        let p = random_dist(&mut rng, v);
        let k = rng.random_range(1..v);
        let delta = rng.random::<f32>() * 0.4;
        let lambda = 1.0 + rng.random::<f32>() * 5.0;
        let cfg = AcceptConfig {
            relaxation: Relaxation::LanternPP { k, lambda },
            residual: Residual::Standard,
            greedy: false,
        };
        let c = sibling_chain(&tree, 0, &p, &cfg, Some(&nb)).unwrap();
        assert!((c.effective.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        if kind == DraftKind::Deterministic {
            // LANTERN++, standard residual: effective <= lambda * p pointwise (sampled drafts:
            // only the marginal over the draws is bounded, see accept_tree.rs)
            for (e, pi) in c.effective.iter().zip(&p) {
                assert!(
                    *e <= lambda * pi + 1e-5,
                    "case {case}: {e} > {lambda} * {pi}"
                );
            }
            // LANTERN with the standard residual: TVD(effective, p) <= delta, all siblings together
            let cfg = AcceptConfig {
                relaxation: Relaxation::Lantern { k, delta },
                ..cfg
            };
            let c = sibling_chain(&tree, 0, &p, &cfg, Some(&nb)).unwrap();
            assert!(tvd(&c.effective, &p) <= delta + 1e-5, "case {case}");
            // exact rule: effective == p
            let cfg = AcceptConfig {
                relaxation: Relaxation::Exact,
                ..cfg
            };
            let c = sibling_chain(&tree, 0, &p, &cfg, None).unwrap();
            assert!(tvd(&c.effective, &p) < 1e-5);
        }
    }
}

#[test]
fn greedy_worked_examples() {
    // codes 0..5; neighbours of 2 are 3, 0, 1, 4 (by construction of the codebook positions)
    let cb = [3.0f32, 2.0, 0.0, 1.0, 4.0];
    let nb = Neighbors::build(&cb, 5, 1, 4, Metric::L2).unwrap();
    assert_eq!(nb.row(2), vec![3, 1, 0, 4]);
    let p = [0.1f32, 0.3, 0.25, 0.2, 0.15];
    let check = |relax: Relaxation, want_abs: f32, want: bool| {
        let (abs, _) = absorbed_mass(&p, 2, &nb, &relax);
        assert!((abs - want_abs).abs() < 1e-6, "{relax:?}: absorbed {abs}");
        assert_eq!(greedy_accepts(&p, 2, abs), want, "{relax:?}");
    };
    check(Relaxation::Exact, 0.0, false);
    check(Relaxation::Lantern { k: 4, delta: 0.1 }, 0.0, false); // p(3) = 0.2 > 0.1
    check(Relaxation::Lantern { k: 4, delta: 0.2 }, 0.2, true); // 0.25 + 0.2 > 0.3
    check(Relaxation::Lantern { k: 4, delta: 0.55 }, 0.5, true); // 3 and 1, then 0 overflows
    check(Relaxation::LanternPP { k: 4, lambda: 1.5 }, 0.0, false); // cap 0.125 < 0.2
    check(Relaxation::LanternPP { k: 4, lambda: 2.0 }, 0.2, true); // cap 0.25
    assert!(greedy_accepts(&p, 1, 0.0));
    // ties: the first index wins, as torch.argmax
    assert!(!greedy_accepts(&[0.3, 0.2, 0.1], 1, 0.1));
    assert!(greedy_accepts(&[0.1, 0.2, 0.3], 1, 0.1));
}

#[test]
fn greedy_tree_takes_longest_path_and_raw_argmax_bonus() {
    let cb = [3.0f32, 2.0, 0.0, 1.0, 4.0];
    let nb = Neighbors::build(&cb, 5, 1, 4, Metric::L2).unwrap();
    // root children: 1 (argmax) and 2 (accepted only with relaxation); child 2 has a child.
    let tree = DraftTree {
        tokens: vec![0, 1, 2, 2],
        parents: vec![0, 0, 0, 2],
        depths: vec![0, 1, 1, 2],
        q: vec![1.0; 4],
        q_dists: vec![None; 4],
        kind: DraftKind::Deterministic,
    };
    let p = vec![0.1f32, 0.3, 0.25, 0.2, 0.15];
    let rows = vec![
        p.clone(),
        vec![0.0, 0.0, 0.0, 0.0, 1.0],
        p.clone(),
        vec![0.5, 0.1, 0.1, 0.1, 0.2],
    ];
    let mut rng = StdRng::seed_from_u64(0);
    let run = |relaxation, rng: &mut StdRng| {
        let cfg = AcceptConfig {
            relaxation,
            residual: Residual::Standard,
            greedy: true,
        };
        accept_tree(&tree, &mut rows.clone(), &cfg, Some(&nb), rng).unwrap()
    };
    let d = run(Relaxation::Exact, &mut rng);
    assert_eq!(
        (d.accepted.clone(), d.next_token, d.tvd.clone()),
        (vec![1], 4, vec![0.0, 0.0])
    );
    let d = run(Relaxation::Lantern { k: 4, delta: 0.2 }, &mut rng);
    // node 2 (token 2, boosted to 0.45) then node 3 (token 2 under p: boosted again) is longer
    assert_eq!(d.accepted, vec![2, 3]);
    assert_eq!(d.next_token, 0); // argmax of the raw row of node 3
    assert!((d.tvd[0] - 0.2).abs() < 1e-6 && (d.tvd[1] - 0.2).abs() < 1e-6 && d.tvd[2] == 0.0);
}

#[test]
fn validation_messages() {
    let bad = [
        Relaxation::Lantern { k: 10, delta: 1.5 },
        Relaxation::Lantern {
            k: 10,
            delta: f32::NAN,
        },
        Relaxation::Lantern { k: 0, delta: 0.1 },
        Relaxation::LanternPP { k: 10, lambda: 0.5 },
        Relaxation::LanternPP {
            k: 100,
            lambda: 2.0,
        },
    ];
    for r in bad {
        assert!(r.validate(100).is_err(), "{r:?}");
    }
    assert!(Relaxation::Lantern { k: 99, delta: 1.0 }
        .validate(100)
        .is_ok());
    // a relaxed rule without a table is an error, not a silent fallback to exact
    let tree = DraftTree {
        tokens: vec![0, 1],
        parents: vec![0, 0],
        depths: vec![0, 1],
        q: vec![1.0; 2],
        q_dists: vec![None; 2],
        kind: DraftKind::Deterministic,
    };
    let cfg = AcceptConfig {
        relaxation: Relaxation::Lantern { k: 1, delta: 0.1 },
        residual: Residual::Standard,
        greedy: false,
    };
    let mut rows = vec![vec![0.5f32, 0.5]; 2];
    let e = accept_tree(&tree, &mut rows, &cfg, None, &mut StdRng::seed_from_u64(0));
    assert!(e.unwrap_err().to_string().contains("neighbour table"));
}

#[test]
fn residual_worked_examples_and_tvd_stats() {
    use lantern::accept::rules::residual_deterministic;
    use lantern::accept::TvdStats;
    let cb = [3.0f32, 2.0, 0.0, 1.0, 4.0];
    let nb = Neighbors::build(&cb, 5, 1, 4, Metric::L2).unwrap();
    let p = [0.1f32, 0.3, 0.25, 0.2, 0.15];
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
    // official, A(2) = {3} used with k = 1: zero 2 and its first k + 1 = 2 neighbours (3, 1)
    let mut r = p.to_vec();
    residual_deterministic(&mut r, 2, 1, 1, Some(&nb), Residual::Official);
    assert!(close(&r, &[0.4, 0.0, 0.0, 0.0, 0.6]), "{r:?}");
    // official without a neighbour set, and standard: zero x only
    for (len, res) in [(0, Residual::Official), (1, Residual::Standard)] {
        let mut r = p.to_vec();
        residual_deterministic(&mut r, 2, len, 1, Some(&nb), res);
        assert!(
            close(&r, &[0.1 / 0.75, 0.3 / 0.75, 0.0, 0.2 / 0.75, 0.15 / 0.75]),
            "{r:?}"
        );
    }
    let mut s = TvdStats::default();
    s.push(&[0.1, 0.3]);
    s.push(&[0.2]);
    assert!((s.mean() - 0.2).abs() < 1e-6 && s.max == 0.3 && s.count == 3);
}
