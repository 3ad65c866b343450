//! The speculative loop's own cost at real model shapes: images generated end to end by
//! [`generate`] with random GPT and drafter weights of a [`StepPreset`], split per
//! verification step into drafting, the target forward, and acceptance (which includes
//! reading target rows off the device and compacting the KV cache). With random weights the
//! drafts are almost never accepted (tau about 1), so every step drafts a full tree: the split
//! shows what the loop costs around each target forward, which is what the 15% overhead
//! target is about. Tokens are meaningless; only times are reported.
//!
//! The loop waits for the device at the end of each phase while the bench runs
//! ([`crate::decode::profile::sync_phases_on_this_thread`]): graph replays are asynchronous, so
//! an unsynchronised verify timer would stop before the target's GPU work and acceptance's
//! first row read would be charged for it (`LANTERN_LOOP_SYNC=0` turns them off, for the wall
//! time of a real generation). The syncs cost a little overlap (in the wall time
//! too).
use super::random::random_var_builder;
use super::steps::StepPreset;
use crate::accept::{AcceptConfig, Metric, Neighbors, Relaxation};
use crate::decode::{generate, Decoding, GenerateOptions, TreeSpec};
use crate::models::drafter::Drafter;
use crate::models::llamagen::{Condition, LlamaGen, ModelType};
use crate::sampling::SamplingParams;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::fmt;
use std::sync::Arc;

/// Names of the loop bench's modes (for [`run_loop_bench`]'s `only`).
pub const LOOP_MODES: [&str; 5] = [
    "ar",
    "sd-static",
    "lantern++-static",
    "sd-dynamic",
    "lantern-dynamic",
];

/// One decoding mode's per-step split (milliseconds per verification step, median image).
#[derive(Clone, Debug)]
pub struct LoopRow {
    pub mode: String,
    /// Verification steps of the image.
    pub steps: usize,
    pub tau: f64,
    pub draft_ms: f64,
    /// Target forward per step (prefill excluded).
    pub verify_ms: f64,
    /// Acceptance, target-row reads and KV compaction per step.
    pub accept_ms: f64,
    /// Wall time of the whole generation per image token (prefill included).
    pub wall_ms_per_token: f64,
    /// The same images' wall time per token run again without the phase syncs (median), when
    /// the split ran with them: what a real generation takes.
    pub free_wall_ms_per_token: Option<f64>,
    /// Wall time per verification step of those runs (prefill included).
    pub free_step_ms: Option<f64>,
    /// Plain AR (no drafting or acceptance: the split columns do not apply).
    pub ar: bool,
}

impl LoopRow {
    /// Everything but the synced verification time as a share of an unsynchronised step
    /// (`1 - verify / step wall`): the loop's overhead with its overlaps (host work queued
    /// while the device runs) counted, when those runs exist.
    pub fn free_overhead_share(&self) -> Option<f64> {
        self.free_step_ms
            .filter(|&w| w > 0.0 && !self.ar)
            .map(|w| (1.0 - self.verify_ms / w).max(0.0))
    }

    /// Drafting + acceptance + compaction as a share of the whole step.
    pub fn overhead_share(&self) -> f64 {
        let total = self.draft_ms + self.verify_ms + self.accept_ms;
        if total > 0.0 {
            (self.draft_ms + self.accept_ms) / total
        } else {
            0.0
        }
    }
}

/// The split of every mode, with what was run.
#[derive(Clone, Debug)]
pub struct LoopReport {
    pub header: String,
    pub rows: Vec<LoopRow>,
}

impl fmt::Display for LoopReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.header)?;
        writeln!(f)?;
        writeln!(
            f,
            "| mode | steps | tau | draft ms/step | verify ms/step | accept + compact ms/step | loop overhead (share of step) | wall ms/token | wall ms/token, no syncs | overhead, no syncs (1 - verify / step) |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        let dash = || "-".to_string();
        for r in &self.rows {
            let share = if r.ar {
                dash()
            } else {
                format!("{:.1}%", 100.0 * r.overhead_share())
            };
            let free = r
                .free_wall_ms_per_token
                .map_or_else(dash, |w| format!("{w:.3}"));
            let free_share = r
                .free_overhead_share()
                .map_or_else(dash, |x| format!("{:.1}%", 100.0 * x));
            writeln!(
                f,
                "| {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {share} | {:.3} | {free} | {free_share} |",
                r.mode, r.steps, r.tau, r.draft_ms, r.verify_ms, r.accept_ms, r.wall_ms_per_token
            )?;
        }
        writeln!(
            f,
            "(random weights accept almost nothing, so speculative rows show the loop's cost per step, not a speed-up)"
        )?;
        Ok(())
    }
}

/// A random codebook's neighbour table (`k` nearest codes of `vocab` random 8-d codes).
fn random_neighbors(vocab: usize, k: usize) -> Result<Neighbors> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let d = 8;
    let codebook: Vec<f32> = (0..vocab * d)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Neighbors::build(&codebook, vocab, d, k.min(vocab - 1), Metric::L2)
}

/// Generates `images` single images of `tokens` tokens (CFG batch 2) per mode, after one
/// untimed image that captures the CUDA graphs, and reports the median image's split; with the
/// phase syncs on (the default) the same images run again without them for the real wall time
/// per token and step.
///
/// Modes: plain AR (its wall time per token is the reference), exact SD on the
/// `naive_extend_57` static tree (sampled), LANTERN++ (lambda 2, k 100) on the same tree, and
/// exact SD on an EAGLE-2 dynamic tree (`dynamic`); `only` keeps the modes named there
/// ([`LOOP_MODES`]; empty: all).
pub fn run_loop_bench(
    preset: StepPreset,
    dtype: DType,
    device: &Device,
    tokens: usize,
    images: usize,
    only: &[String],
) -> Result<LoopReport> {
    if let Some(bad) = only.iter().find(|m| !LOOP_MODES.contains(&m.as_str())) {
        return Err(crate::Error::invalid(
            "loop mode",
            format!("{bad} (use one of {})", LOOP_MODES.join(", ")),
        ));
    }
    // `LANTERN_LOOP_SYNC=0`: no phase syncs (the wall time of a real generation; the phase
    // columns then charge asynchronous GPU work to whichever phase waits for it)
    let sync = std::env::var("LANTERN_LOOP_SYNC").map_or(true, |v| v != "0");
    let tc = preset.target();
    let model = LlamaGen::load(random_var_builder(dtype, device), &tc)?;
    let dc = preset.drafter();
    let drafter = Drafter::load(random_var_builder(dtype, device), &dc)?;
    drafter.check_target(&tc)?;
    let cond = match tc.model_type {
        ModelType::C2i => Condition::Classes(vec![1]),
        ModelType::T2i => Condition::Captions {
            features: Tensor::randn(0f32, 1.0, (1, tc.cls_token_num, tc.caption_dim), device)?
                .to_dtype(dtype)?,
            mask: Tensor::ones((1, tc.cls_token_num), DType::F32, device)?,
        },
    };
    let neighbors = Arc::new(random_neighbors(tc.vocab_size, 100)?);
    let tokens = tokens.clamp(1, tc.block_size);
    // name, then the tree and rule of a speculative mode (none: plain AR)
    let lantern_pp = Relaxation::LanternPP {
        k: 100,
        lambda: 2.0,
    };
    let modes: Vec<(&str, Option<(&str, Relaxation)>)> = vec![
        ("ar", None),
        ("sd static", Some(("naive_extend_57", Relaxation::Exact))),
        ("lantern++ static", Some(("naive_extend_57", lantern_pp))),
        ("sd dynamic", Some(("dynamic", Relaxation::Exact))),
        // the paper's method: LANTERN's additive budget (the CLI's default delta) on EAGLE-2
        (
            "lantern dynamic",
            Some(("dynamic", Relaxation::Lantern { k: 100, delta: 0.2 })),
        ),
    ];
    let mut rows = Vec::new();
    for (name, spec) in modes {
        if !only.is_empty() && !only.iter().any(|m| *m == name.replace(' ', "-")) {
            continue;
        }
        let decoding = match spec {
            None => Decoding::Ar,
            Some((tree, relaxation)) => Decoding::Speculative {
                tree: TreeSpec::parse(tree)?,
                accept: AcceptConfig {
                    relaxation,
                    ..AcceptConfig::default()
                },
                neighbors: (!relaxation.is_exact()).then(|| neighbors.clone()),
            },
        };
        let opts = GenerateOptions::new()
            .with_sampling(SamplingParams::default())
            .with_decoding(decoding)
            .with_max_tokens(tokens);
        let run = |i: usize| -> Result<(crate::decode::Output, f64)> {
            let t0 = std::time::Instant::now();
            let out = generate(
                &model,
                Some(&drafter),
                &cond,
                &opts.clone().with_seed(i as u64),
            )?;
            Ok((out, t0.elapsed().as_secs_f64()))
        };
        let mut split = Vec::new();
        let syncs = sync.then(crate::decode::profile::sync_phases_on_this_thread);
        for i in 0..=images {
            let (out, wall) = run(i)?;
            if i == 0 {
                continue;
            }
            let s = &out.stats[0];
            let steps = s.accepted_per_step.len().max(1);
            // the target forward count includes the prefill: take its share out of verify
            let fwd = s.target_forwards.max(1);
            let per = 1e3 / steps as f64;
            split.push(LoopRow {
                mode: match spec {
                    None => name.to_string(),
                    Some((tree, _)) => format!("{name} ({tree})"),
                },
                steps,
                tau: s.tau,
                draft_ms: s.time_draft * per,
                verify_ms: s.time_verify * (fwd - 1).max(1) as f64 / fwd as f64 * per,
                accept_ms: s.time_accept * per,
                wall_ms_per_token: wall * 1e3 / out.tokens[0].len().max(1) as f64,
                free_wall_ms_per_token: None,
                free_step_ms: None,
                ar: spec.is_none(),
            });
        }
        drop(syncs);
        // the same images without the phase syncs (graphs already captured): the real wall
        let mut free: Vec<(f64, f64)> = Vec::new();
        if sync {
            for i in 1..=images {
                let (out, wall) = run(i)?;
                let steps = out.stats[0].accepted_per_step.len().max(1);
                let tokens = out.tokens[0].len().max(1);
                free.push((wall * 1e3 / tokens as f64, wall * 1e3 / steps as f64));
            }
            free.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        split.sort_by(|a, b| a.wall_ms_per_token.total_cmp(&b.wall_ms_per_token));
        if let Some(r) = split.get(split.len() / 2) {
            let mut r = r.clone();
            if let Some(&(w, st)) = free.get(free.len() / 2) {
                r.free_wall_ms_per_token = Some(w);
                r.free_step_ms = Some(st);
            }
            rows.push(r);
        }
    }
    Ok(LoopReport {
        header: format!(
            "speculative loop on {:?} ({dtype:?}, CFG batch 2, preset {}, random weights, {tokens} tokens per image, median of {images} images; {})",
            device.location(),
            preset.name(),
            if sync {
                "device synchronised at each phase end"
            } else {
                "phases not synchronised (LANTERN_LOOP_SYNC=0): compare wall times only"
            }
        ),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_loop_reports_every_mode() -> Result<()> {
        let r = run_loop_bench(StepPreset::Tiny, DType::F32, &Device::Cpu, 8, 1, &[])?;
        assert_eq!(r.rows.len(), LOOP_MODES.len());
        let ar = &r.rows[0];
        assert!(
            ar.ar && ar.steps == 8 && ar.tau == 1.0 && ar.wall_ms_per_token > 0.0,
            "{ar:?}"
        );
        assert_eq!((ar.draft_ms, ar.accept_ms), (0.0, 0.0));
        assert!(ar.free_wall_ms_per_token.is_some_and(|w| w > 0.0), "{ar:?}");
        assert_eq!(ar.free_overhead_share(), None);
        for row in &r.rows[1..] {
            assert!(!row.ar && row.wall_ms_per_token > 0.0, "{row:?}");
            assert!(row.steps >= 1 && row.tau >= 1.0, "{row:?}");
            assert!(row.draft_ms > 0.0 && row.verify_ms > 0.0, "{row:?}");
            let share = row.overhead_share();
            assert!(share > 0.0 && share < 1.0, "{row:?}");
            let free = row.free_overhead_share().expect("unsynced runs");
            assert!((0.0..1.0).contains(&free), "{row:?}");
        }
        let text = r.to_string();
        assert!(text.contains("lantern++ static") && text.contains("loop overhead"));
        assert!(text.contains("lantern dynamic (dynamic)"), "{text}");
        let one = ["sd-dynamic".to_string()];
        let r = run_loop_bench(StepPreset::Tiny, DType::F32, &Device::Cpu, 4, 1, &one)?;
        assert_eq!(r.rows.len(), 1);
        assert!(r.rows[0].mode.starts_with("sd dynamic"), "{:?}", r.rows[0]);
        let bad = ["sd".to_string()];
        let e = run_loop_bench(StepPreset::Tiny, DType::F32, &Device::Cpu, 4, 1, &bad);
        assert!(e.is_err_and(|e| e.to_string().contains("sd-static")));
        Ok(())
    }
}
