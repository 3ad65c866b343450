//! The GPU path's speed targets checked against measured reports, printed by `lantern bench
//! --random-weights` as one table: the one-token decode step's share of its bandwidth bound
//! (goal >= 60%), a tree verification step's time over the decode step's (goal <= 1.3x) and the
//! speculative loop's own overhead per step (drafting + acceptance + compaction, goal <= 15%
//! of a step). The targets are the ones set for GPT-XL shapes, batch 2, bf16 on an H100; on
//! other presets or devices the table still says where a run stands against them.
use std::fmt;

use super::spec_loop::LoopReport;
use super::steps::{Step, StepReport};

/// Least share of its bandwidth bound the one-token decode step should reach.
pub const DECODE_BOUND_SHARE: f64 = 0.60;
/// Most the tree verification step may take, in decode steps.
pub const VERIFY_OVER_DECODE: f64 = 1.3;
/// Most share of a speculative step the loop's own work may take.
pub const LOOP_OVERHEAD_SHARE: f64 = 0.15;

/// One target against its measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub goal: String,
    pub met: bool,
}

/// The checks a run measured: the step targets from `steps` (the fastest decode and verify
/// rows, as [`StepReport::row`] picks them), the loop target from `loops` (its worst
/// speculative row). Targets whose steps were not measured are left out.
pub fn check_targets(steps: &StepReport, loops: Option<&LoopReport>) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let decode = steps.row(Step::Decode);
    if let Some(d) = decode {
        let share = d.bound_bw_ms / d.measured_ms;
        out.push(TargetCheck {
            target: format!("decode step ({}), share of its bandwidth bound", d.name),
            measured: format!("{:.1}%", 100.0 * share),
            goal: format!(">= {:.0}%", 100.0 * DECODE_BOUND_SHARE),
            met: share >= DECODE_BOUND_SHARE,
        });
    }
    if let (Some(d), Some(v)) = (decode, steps.row(Step::Verify)) {
        let ratio = v.measured_ms / d.measured_ms;
        out.push(TargetCheck {
            target: format!("{} over the decode step", v.name),
            measured: format!("{ratio:.2}x"),
            goal: format!("<= {VERIFY_OVER_DECODE}x"),
            met: ratio <= VERIFY_OVER_DECODE,
        });
    }
    let worst = loops.and_then(|l| {
        l.rows
            .iter()
            .filter(|r| !r.ar)
            .max_by(|a, b| a.overhead_share().total_cmp(&b.overhead_share()))
    });
    if let Some(r) = worst {
        let share = r.overhead_share();
        out.push(TargetCheck {
            target: format!("loop overhead per step (worst mode: {})", r.mode),
            // the synced split decides; the unsynchronised figure is shown next to it
            measured: match r.free_overhead_share() {
                Some(free) => format!("{:.1}% (no syncs: {:.1}%)", 100.0 * share, 100.0 * free),
                None => format!("{:.1}%", 100.0 * share),
            },
            goal: format!("<= {:.0}%", 100.0 * LOOP_OVERHEAD_SHARE),
            met: share <= LOOP_OVERHEAD_SHARE,
        });
    }
    out
}

/// [`check_targets`]' result as a table.
pub struct TargetTable(pub Vec<TargetCheck>);

impl fmt::Display for TargetTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "targets (set for GPT-XL shapes, batch 2, bf16 on an H100):"
        )?;
        writeln!(f, "| target | measured | goal | met |")?;
        writeln!(f, "|---|---:|---:|---|")?;
        for c in &self.0 {
            let met = if c.met { "yes" } else { "no" };
            writeln!(f, "| {} | {} | {} | {met} |", c.target, c.measured, c.goal)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::spec_loop::LoopRow;
    use crate::bench::steps::StepRow;

    fn row(name: &str, ms: f64, bound: f64) -> StepRow {
        StepRow {
            name: name.into(),
            measured_ms: ms,
            bytes: 1.0,
            flops: 1.0,
            bound_bw_ms: bound,
            bound_flops_ms: 0.0,
            efficiency: bound / ms,
        }
    }

    fn loop_row(mode: &str, draft: f64, verify: f64, accept: f64, ar: bool) -> LoopRow {
        LoopRow {
            mode: mode.into(),
            steps: 10,
            tau: 1.0,
            draft_ms: draft,
            verify_ms: verify,
            accept_ms: accept,
            wall_ms_per_token: 1.0,
            free_wall_ms_per_token: None,
            free_step_ms: None,
            ar,
        }
    }

    #[test]
    fn targets_use_the_fastest_steps_and_the_worst_loop_mode() {
        let steps = StepReport {
            device: "test".into(),
            copy_gbps: 1.0,
            matmul_tflops: 1.0,
            rows: vec![
                row("decode 1 tok", 2.0, 0.5),
                row("decode 1 tok (cuda graph)", 1.0, 0.5),
                row("verify 59 tok", 1.5, 0.6),
            ],
        };
        let loops = LoopReport {
            header: String::new(),
            rows: vec![
                loop_row("ar", 0.0, 1.0, 0.0, true),
                loop_row("sd static", 1.0, 8.0, 1.0, false),
                loop_row("sd dynamic", 3.0, 6.0, 1.0, false),
            ],
        };
        let c = check_targets(&steps, Some(&loops));
        assert_eq!(c.len(), 3);
        // the graph row (1.0 ms) is the decode step: 50% of its bound, below 60%
        assert_eq!(c[0].measured, "50.0%");
        assert!(!c[0].met);
        assert!(c[0].target.contains("cuda graph"));
        // 1.5 / 1.0
        assert_eq!(c[1].measured, "1.50x");
        assert!(!c[1].met);
        // the worst speculative mode: (3 + 1) / 10; AR is not a speculative mode
        assert_eq!(c[2].measured, "40.0%");
        assert!(c[2].target.contains("sd dynamic"));
        assert!(!c[2].met);
        let table = TargetTable(c).to_string();
        assert_eq!(table.matches("| no |").count(), 3, "{table}");

        // within the goals
        let steps = StepReport {
            rows: vec![
                row("decode 1 tok", 1.0, 0.7),
                row("verify 59 tok", 1.2, 0.8),
            ],
            ..steps
        };
        let loops = LoopReport {
            header: String::new(),
            rows: vec![loop_row("sd static", 0.5, 9.0, 0.5, false)],
        };
        let c = check_targets(&steps, Some(&loops));
        assert!(c.iter().all(|c| c.met), "{c:?}");
        // nothing measured, nothing claimed
        let empty = StepReport {
            rows: vec![],
            ..steps
        };
        assert!(check_targets(&empty, None).is_empty());
    }
}
