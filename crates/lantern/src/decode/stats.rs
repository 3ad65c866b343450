//! Per-image decoding statistics (`--stats-json`).
use serde::Serialize;

/// What one image's decoding cost and how much the drafts helped.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DecodeStats {
    /// Target forwards, prefill included.
    pub target_forwards: usize,
    /// Drafter forwards (batched over images: one call counts once).
    pub drafter_forwards: usize,
    /// Tokens committed by each verification step (accepted drafts + the bonus/residual token).
    pub accepted_per_step: Vec<usize>,
    /// Mean tokens per verification step (plain AR: 1.0).
    pub tau: f64,
    /// Seconds spent drafting trees.
    pub time_draft: f64,
    /// Seconds spent in target forwards (verification, prefill and AR steps).
    pub time_verify: f64,
    /// Seconds spent in acceptance (including pulling target rows off the device and cache
    /// compaction).
    pub time_accept: f64,
    /// Mean per-token TVD reported by the acceptance rule (0 for exact rules).
    pub tvd_mean: f64,
    /// Largest per-token TVD.
    pub tvd_max: f64,
}

impl DecodeStats {
    /// Fills `tau` from `accepted_per_step` and the TVD summaries from `tvds`.
    pub fn finish(&mut self, tvds: &[f32]) {
        let steps = self.accepted_per_step.len();
        self.tau = if steps == 0 {
            1.0
        } else {
            self.accepted_per_step.iter().sum::<usize>() as f64 / steps as f64
        };
        if !tvds.is_empty() {
            self.tvd_mean = tvds.iter().map(|&x| x as f64).sum::<f64>() / tvds.len() as f64;
            self.tvd_max = tvds.iter().fold(0.0f64, |m, &x| m.max(x as f64));
        }
    }
}
