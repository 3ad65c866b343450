//! Training a class-conditional LlamaGen GPT on token sequences, with LlamaGen's recipe where it
//! applies at our scale: class-label dropout (10%) to learn the null class used by CFG, loss on
//! every image token with the class position predicting token 0, weights initialised N(0, 0.02)
//! with a zero output layer, AdamW (betas 0.9/0.95), linear warm-up then cosine decay.
//! Not reproduced: token/residual/FFN dropout (our model is small and trained briefly).
use super::{save_checkpoint, TrainState};
use crate::data::TokenDataset;
use crate::models::llamagen::{Condition, Config, LlamaGen};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Settings of a GPT training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GptTrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Probability of replacing the class by the null class.
    pub class_dropout: f64,
    /// Steps between checkpoints (and test-loss evaluations).
    pub ckpt_every: usize,
    /// Seed for initialisation, shuffling and label dropout.
    pub seed: u64,
    /// Stop with a checkpoint once this much wall time has passed (resume later).
    pub time_limit_s: Option<f64>,
}

impl Default for GptTrainConfig {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch_size: 64,
            lr: 3e-4,
            weight_decay: 0.05,
            warmup: 500,
            class_dropout: 0.1,
            ckpt_every: 1000,
            seed: 0,
            time_limit_s: None,
        }
    }
}

/// What a run reports at each checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct GptCheckpoint {
    /// Optimiser step.
    pub step: usize,
    /// Mean training loss since the previous checkpoint.
    pub train_loss: f64,
    /// Test cross-entropy per token (nats).
    pub test_loss: f64,
}

/// LlamaGen's initialisation: every weight matrix N(0, 0.02), norms 1, output layer zero.
pub fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("variables", "lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        if var.dims().len() < 2 {
            continue;
        }
        let t = if name.starts_with("output") {
            var.zeros_like()?
        } else {
            let n = var.elem_count();
            let vals: Vec<f32> = (0..n).map(|_| 0.02 * normal(&mut rng)).collect();
            Tensor::from_vec(vals, var.shape(), var.device())?.to_dtype(var.dtype())?
        };
        var.set(&t)?;
    }
    Ok(())
}

fn normal<R: Rng>(rng: &mut R) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn check_data(cfg: &Config, data: &TokenDataset) -> Result<()> {
    if data.seq_len() != cfg.block_size || data.vocab > cfg.vocab_size {
        return Err(Error::invalid(
            "token dataset",
            format!(
                "{} tokens per image over {} codes, the model expects {} over {}: tokenize with the matching VQ model",
                data.seq_len(),
                data.vocab,
                cfg.block_size,
                cfg.vocab_size
            ),
        ));
    }
    if let Some(&l) = data.labels.iter().find(|&&l| l as usize >= cfg.num_classes) {
        return Err(Error::invalid(
            "token dataset",
            format!("label {l} but the model has {} classes", cfg.num_classes),
        ));
    }
    Ok(())
}

/// Mean next-token cross-entropy (nats per token) of `model` on `idx` of `data`.
pub fn batch_loss(
    model: &LlamaGen,
    data: &TokenDataset,
    idx: &[usize],
    labels: &[u32],
) -> Result<Tensor> {
    let dev = model.device().clone();
    let n = data.seq_len();
    let mut toks = Vec::with_capacity(idx.len() * n);
    for &i in idx {
        toks.extend_from_slice(data.sequence(i));
    }
    let targets = Tensor::from_vec(toks, (idx.len(), n), &dev)?;
    let inputs = targets.narrow(1, 0, n - 1)?;
    let cond = model.embed_condition(&Condition::Classes(labels.to_vec()))?;
    let (_, logits) = model.forward_train(&cond, &inputs, None)?;
    // the class position predicts token 0; position cls+i-1 predicts token i
    let cls = model.config().cls_token_num;
    let logits = logits.narrow(1, cls - 1, n)?;
    let v = logits.dim(D::Minus1)?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.reshape((idx.len() * n, v))?,
        &targets.flatten_all()?,
    )?)
}

/// Test cross-entropy per token over at most `max_images` images.
pub fn evaluate(
    model: &LlamaGen,
    data: &TokenDataset,
    max_images: usize,
    batch: usize,
) -> Result<f64> {
    let n = data.len().min(max_images);
    let (mut total, mut count) = (0f64, 0usize);
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let labels: Vec<u32> = chunk.iter().map(|&i| data.labels[i]).collect();
        let l = batch_loss(model, data, chunk, &labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        total += l * chunk.len() as f64;
        count += chunk.len();
    }
    Ok(total / count.max(1) as f64)
}

/// File name of the resume state written by GPT runs before they used the shared
/// [`TrainState`] (`{"step": N}` next to f32 `model.safetensors`). Still read, never written.
pub const LEGACY_STATE_FILE: &str = "state.json";

/// Reads a run's resume state: `train_state.json`, or else the legacy `state.json`
/// ([`LEGACY_STATE_FILE`]), whose missing seed and loss are taken as `seed` and NaN.
/// `Ok(None)` when the folder holds neither.
pub fn read_state(dir: &Path, seed: u64) -> Result<Option<TrainState>> {
    if let Some(st) = TrainState::read(dir)? {
        return Ok(Some(st));
    }
    let p = dir.join(LEGACY_STATE_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::load(&p, e.to_string()))?;
    let step = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["step"].as_u64())
        .ok_or_else(|| {
            Error::load(
                &p,
                "no step count in the old-format training state; delete the folder to start afresh",
            )
        })?;
    Ok(Some(TrainState {
        step: step as usize,
        seed,
        loss: f64::NAN,
    }))
}

/// Trains (or resumes, when `resume` is set and `out` holds a resume state, see [`read_state`])
/// a GPT; checkpoints go through [`save_checkpoint`]. `on_checkpoint` is called after every
/// checkpoint with the model (e.g. to render samples); `progress(step, loss)` after every step.
#[allow(clippy::too_many_arguments)]
pub fn train_gpt(
    cfg: &Config,
    tcfg: &GptTrainConfig,
    train: &TokenDataset,
    test: &TokenDataset,
    out: &Path,
    resume: bool,
    device: &Device,
    progress: &mut dyn FnMut(usize, f64),
    on_checkpoint: &mut dyn FnMut(&LlamaGen, &GptCheckpoint) -> Result<()>,
) -> Result<LlamaGen> {
    cfg.validate()?;
    check_data(cfg, train)?;
    check_data(cfg, test)?;
    std::fs::create_dir_all(out).map_err(|e| Error::Write {
        path: out.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = LlamaGen::load(vb, cfg)?;
    let mut start = 0usize;
    let state = if resume {
        read_state(out, tcfg.seed)?
    } else {
        None
    };
    if let Some(st) = &state {
        let weights = out.join("model.safetensors");
        varmap
            .load(&weights)
            .map_err(|e| Error::load(&weights, e.to_string()))?;
        start = st.step;
    } else {
        init_weights(&varmap, tcfg.seed)?;
    }
    let config_json = serde_json::to_string_pretty(&cfg.to_hf_json())
        .map_err(|e| Error::invalid("config", e.to_string()))?;
    crate::image::write_atomic(&out.join("config.json"), config_json.as_bytes(), true)?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: tcfg.lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: tcfg.weight_decay,
        },
    )?;
    let mut csv = crate::train::LossLog::open(
        &out.join("losses.csv"),
        &["step", "lr", "train_loss", "test_loss"],
        start > 0,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(tcfg.seed.wrapping_add(start as u64));
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0;
    let (mut acc, mut acc_n) = (0f64, 0usize);
    let t0 = std::time::Instant::now();
    for step in start..tcfg.steps {
        if cursor + tcfg.batch_size > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let idx = &order[cursor..cursor + tcfg.batch_size.min(order.len())];
        cursor += idx.len();
        let labels: Vec<u32> = idx
            .iter()
            .map(|&i| {
                if rng.random::<f64>() < tcfg.class_dropout {
                    cfg.num_classes as u32
                } else {
                    train.labels[i]
                }
            })
            .collect();
        let lr = crate::train::cosine_lr(step, tcfg.steps, tcfg.lr, tcfg.warmup, 0.1);
        opt.set_learning_rate(lr);
        let loss = batch_loss(&model, train, idx, &labels)?;
        opt.backward_step(&loss)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        acc += l;
        acc_n += 1;
        progress(step + 1, l);
        let out_of_time = tcfg
            .time_limit_s
            .is_some_and(|t| t0.elapsed().as_secs_f64() >= t);
        let last = step + 1 == tcfg.steps || out_of_time;
        if (step + 1) % tcfg.ckpt_every == 0 || last {
            let test_loss = evaluate(&model, test, 1000, tcfg.batch_size)?;
            let ck = GptCheckpoint {
                step: step + 1,
                train_loss: acc / acc_n.max(1) as f64,
                test_loss,
            };
            csv.row(ck.step, &[lr, ck.train_loss, ck.test_loss])?;
            if !ck.train_loss.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!(
                        "loss became {} by step {}; lower the learning rate",
                        ck.train_loss, ck.step
                    ),
                ));
            }
            let st = TrainState {
                step: ck.step,
                seed: tcfg.seed,
                loss: ck.train_loss,
            };
            save_checkpoint(out, &varmap, &config_json, &st)?;
            on_checkpoint(&model, &ck)?;
            acc = 0.0;
            acc_n = 0;
            if out_of_time {
                break;
            }
        }
    }
    Ok(model)
}

/// Turns the f32 checkpoint of a run folder into a shippable folder: `config.json` (HF-style)
/// + f16 `model.safetensors` under the original tensor names.
pub fn export_f16(run_dir: &Path, cfg: &Config, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    })?;
    let src = run_dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&src, &Device::Cpu)
        .map_err(|e| Error::load(&src, e.to_string()))?;
    let mut map = std::collections::HashMap::new();
    for (name, t) in tensors {
        map.insert(name, t.to_dtype(DType::F16)?);
    }
    let path = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::Write {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::Write {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap_or_default(),
    )?;
    Ok(())
}

#[cfg(test)]
fn tests_cfg() -> Config {
    use crate::models::llamagen::ModelType;
    Config {
        dim: 32,
        n_layer: 2,
        n_head: 4,
        n_kv_head: 4,
        vocab_size: 16,
        ffn_hidden: 64,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        model_type: ModelType::C2i,
        num_classes: 3,
        caption_dim: 8,
        cls_token_num: 1,
        block_size: 16,
        extra_rope_rows: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A learnable pattern: token i of an image of class c is (c + i) mod 16.
    fn pattern_data() -> TokenDataset {
        let (mut tokens, mut labels) = (Vec::new(), Vec::new());
        for k in 0..24 {
            let c = (k % 3) as u32;
            labels.push(c);
            tokens.extend((0..16).map(|i| (c + i as u32) % 16));
        }
        TokenDataset {
            tokens,
            labels,
            grid: (4, 4),
            vocab: 16,
        }
    }

    fn quick(steps: usize) -> GptTrainConfig {
        GptTrainConfig {
            steps,
            batch_size: 8,
            lr: 3e-3,
            warmup: 5,
            ckpt_every: 20,
            class_dropout: 0.0,
            ..Default::default()
        }
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lantern-gpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Runs `train_gpt` quietly; returns the model and the (step, loss) progress reports.
    fn run(
        tcfg: &GptTrainConfig,
        dir: &Path,
        resume: bool,
    ) -> Result<(LlamaGen, Vec<(usize, f64)>)> {
        let data = pattern_data();
        let mut seen = Vec::new();
        let m = train_gpt(
            &tests_cfg(),
            tcfg,
            &data,
            &data,
            dir,
            resume,
            &Device::Cpu,
            &mut |s, l| seen.push((s, l)),
            &mut |_, _| Ok(()),
        )?;
        Ok((m, seen))
    }

    #[test]
    fn a_few_steps_lower_the_loss_and_resume_continues() -> Result<()> {
        let cfg = tests_cfg();
        let data = pattern_data();
        let dir = temp_dir("train");
        let tcfg = quick(40);
        let mut losses = Vec::new();
        let mut cks = Vec::new();
        let trained = train_gpt(
            &cfg,
            &tcfg,
            &data,
            &data,
            &dir,
            false,
            &Device::Cpu,
            &mut |_, l| losses.push(l),
            &mut |_, ck| {
                cks.push(ck.test_loss);
                Ok(())
            },
        )?;
        assert!(
            losses[0] > 2.5,
            "initial loss {} should be ~ln 16",
            losses[0]
        );
        assert!(
            cks[1] < 0.5 * losses[0],
            "test loss {:?} did not fall from {}",
            cks,
            losses[0]
        );
        // the shared checkpoint layout, and no legacy state file
        let st = TrainState::read(&dir)?.expect("train_state.json written");
        assert_eq!((st.step, st.seed), (40, tcfg.seed));
        assert!(st.loss.is_finite() && st.loss < losses[0]);
        assert!(!dir.join(LEGACY_STATE_FILE).exists());
        // resuming at the saved step trains nothing and holds exactly the saved weights
        let (loaded, none) = run(&tcfg, &dir, true)?;
        assert!(none.is_empty(), "{none:?}");
        let saved = evaluate(&trained, &data, 8, 8)?;
        assert_eq!(evaluate(&loaded, &data, 8, 8)?, saved);
        // resume for 10 more steps: starts from the saved step, keeps the learned weights
        let (_, resumed) = run(&quick(50), &dir, true)?;
        assert_eq!(resumed.first().map(|r| r.0), Some(41));
        assert!(resumed[0].1 < 0.6 * losses[0]);
        assert_eq!(TrainState::read(&dir)?.map(|s| s.step), Some(50));
        let csv = std::fs::read_to_string(dir.join("losses.csv"))?;
        assert_eq!(csv.lines().count(), 1 + 3, "{csv}");
        // the f16 export loads through the checkpoint loader with its config.json
        export_f16(&dir, &cfg, &dir.join("export"))?;
        let (m, _) =
            crate::load::load_llamagen(&dir.join("export"), None, DType::F32, &Device::Cpu)?;
        assert_eq!(m.config(), &cfg);
        let l = evaluate(&m, &data, 8, 8)?;
        assert!(l < 0.6 * losses[0], "exported model lost its training: {l}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn resumes_from_a_legacy_state_json_folder() -> Result<()> {
        let data = pattern_data();
        let dir = temp_dir("legacy");
        let mut tcfg = quick(6);
        tcfg.ckpt_every = 3;
        tcfg.seed = 7;
        let (trained, _) = run(&tcfg, &dir, false)?;
        let fresh_dir = temp_dir("legacy-fresh");
        let fresh = evaluate(&run(&quick(0), &fresh_dir, false)?.0, &data, 8, 8)?;
        std::fs::remove_dir_all(&fresh_dir).ok();
        let saved = evaluate(&trained, &data, 8, 8)?;
        assert!(
            saved < fresh,
            "training did not move the weights: {saved} vs {fresh}"
        );
        // turn the folder into what the old trainer wrote: state.json holding only the step
        std::fs::remove_file(dir.join(TrainState::FILE))?;
        std::fs::write(dir.join(LEGACY_STATE_FILE), r#"{"step":6}"#)?;
        let st = read_state(&dir, 7)?.expect("legacy state read");
        assert_eq!((st.step, st.seed), (6, 7));
        let (loaded, none) = run(&tcfg, &dir, true)?;
        assert!(none.is_empty(), "{none:?}");
        assert_eq!(evaluate(&loaded, &data, 8, 8)?, saved);
        // continuing writes the new format only; train_state.json wins over the stale file
        let (_, resumed) = run(&quick(8), &dir, true)?;
        assert_eq!(resumed.iter().map(|r| r.0).collect::<Vec<_>>(), [7, 8]);
        assert_eq!(read_state(&dir, 0)?.map(|s| s.step), Some(8));
        // a legacy file without a step is a one-line load error, not a silent restart
        std::fs::remove_file(dir.join(TrainState::FILE))?;
        std::fs::write(dir.join(LEGACY_STATE_FILE), "{}")?;
        let err = read_state(&dir, 0).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
