//! Training loops and the utilities they share: learning-rate schedule, CSV loss log,
//! checkpoint save / resume helpers and progress reports.
//!
//! A checkpoint folder holds `config.json` (the model config), `model.safetensors` (weights under
//! the model's own key names, loadable for inference), `train_state.json` ([`TrainState`]) and
//! `losses.csv`.
pub mod distill;
pub mod drafter;
pub mod export;
pub mod gpt;
pub mod vq;

pub use export::save_varmap_f16;
pub use gpt::{train_gpt, GptTrainConfig};

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One progress report, sent every `log_every` steps and at the end.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    /// Steps done so far.
    pub step: usize,
    /// Total steps of the run.
    pub steps: usize,
    /// Total loss of the last step.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Seconds since the run (or the resumed run) started.
    pub elapsed_s: f64,
}

/// Linear warm-up over `warmup` steps, then cosine decay from `base` to `base * min_ratio`.
pub fn cosine_lr(step: usize, total: usize, base: f64, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f64 / span as f64).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
    base * (min_ratio + (1.0 - min_ratio) * cos)
}

/// Resume information stored next to the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Seed of the run (batches are drawn from `seed + step`, so a resumed run continues the
    /// same stream).
    pub seed: u64,
    /// Last logged total loss.
    pub loss: f64,
}

impl TrainState {
    /// File name inside a checkpoint folder.
    pub const FILE: &'static str = "train_state.json";

    /// Reads `dir/train_state.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(Self::FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::load(&p, e.to_string()))?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::load(
                &p,
                format!("{e} (corrupt training state; delete the folder to start afresh)"),
            )
        })
    }
}

/// Writes a checkpoint into `dir`: `model.safetensors` from `varmap`, `config.json`, and
/// `train_state.json` last (so a folder with a state file always has complete weights).
/// Every file goes through a temporary file and a rename.
pub fn save_checkpoint(
    dir: &Path,
    varmap: &candle_nn::VarMap,
    config_json: &str,
    state: &TrainState,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.into(),
        msg: e.to_string(),
    })?;
    let tmp = dir.join(".model.safetensors.tmp");
    varmap.save(&tmp).map_err(|e| Error::Write {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    crate::image::write_atomic(&dir.join("config.json"), config_json.as_bytes(), true)?;
    let st =
        serde_json::to_string_pretty(state).map_err(|e| Error::invalid("state", e.to_string()))?;
    crate::image::write_atomic(&dir.join(TrainState::FILE), st.as_bytes(), true)
}

/// Appends rows to a CSV loss log.
#[derive(Debug)]
pub struct LossLog {
    file: std::fs::File,
    path: PathBuf,
}

impl LossLog {
    /// Opens `path`; a new (or, without `append`, truncated) file gets `header` as first line.
    pub fn open(path: &Path, header: &[&str], append: bool) -> Result<Self> {
        let existed = append && path.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(|e| Error::Write {
                path: path.into(),
                msg: e.to_string(),
            })?;
        let mut log = Self {
            file,
            path: path.into(),
        };
        if !existed {
            log.write_line(&header.join(","))?;
        }
        Ok(log)
    }

    /// Appends one row: the step, then the values.
    pub fn row(&mut self, step: usize, values: &[f64]) -> Result<()> {
        let mut line = step.to_string();
        for v in values {
            line.push_str(&format!(",{v:.6}"));
        }
        self.write_line(&line)
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}").map_err(|e| Error::Write {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_shape() {
        assert!((cosine_lr(0, 100, 1.0, 10, 0.1) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 100, 1.0, 10, 0.1) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 100, 1.0, 10, 0.1) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(100, 100, 1.0, 10, 0.1) - 0.1).abs() < 1e-12);
        assert!(cosine_lr(50, 100, 1.0, 10, 0.1) < cosine_lr(40, 100, 1.0, 10, 0.1));
    }
}
