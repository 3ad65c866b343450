//! Training a class-conditional LlamaGen GPT on token sequences, with LlamaGen's recipe where it
//! applies at our scale: class-label dropout (10%) to learn the null class used by CFG, loss on
//! every image token with the class position predicting token 0, weights initialised N(0, 0.02)
//! with a zero output layer, AdamW (betas 0.9/0.95), linear warm-up then cosine decay.
//! Not reproduced: token/residual/FFN dropout (our model is small and trained briefly).
use crate::data::TokenDataset;
use crate::models::llamagen::{Condition, Config, LlamaGen};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// Output folder layout of a run: `config.json`, `model.safetensors` (f32, for resume and
/// export), `state.json` (step), `losses.csv`.
pub struct RunDir(pub PathBuf);

impl RunDir {
    fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
}

/// Trains (or resumes, when `out/state.json` exists and `resume` is set) a GPT. `on_checkpoint`
/// is called after every checkpoint with the model (e.g. to render samples); `progress(step,
/// loss)` after every step.
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
    let run = RunDir(out.to_path_buf());
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = LlamaGen::load(vb, cfg)?;
    let mut start = 0usize;
    if resume && run.state().exists() {
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.state())?)
            .map_err(|e| Error::load(run.state(), e.to_string()))?;
        start = state["step"].as_u64().unwrap_or(0) as usize;
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_weights(&varmap, tcfg.seed)?;
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap_or_default(),
    )?;
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
            crate::train::export::save_tensors(
                &varmap,
                &out.join("model.safetensors"),
                DType::F32,
            )?;
            std::fs::write(
                run.state(),
                serde_json::json!({ "step": step + 1 }).to_string(),
            )?;
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
    fn tiny() -> Config {
        super::tests_cfg()
    }
    #[test]
    fn a_few_steps_lower_the_loss_and_resume_continues() -> Result<()> {
        let cfg = tiny();
        // a learnable pattern: token i of an image of class c is (c + i) mod 16
        let n = 24;
        let mut tokens = Vec::new();
        let mut labels = Vec::new();
        for k in 0..n {
            let c = (k % 3) as u32;
            labels.push(c);
            tokens.extend((0..16).map(|i| (c + i as u32) % 16));
        }
        let data = TokenDataset {
            tokens,
            labels,
            grid: (4, 4),
            vocab: 16,
        };
        let dir = std::env::temp_dir().join(format!("lantern-gpt-train-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tcfg = GptTrainConfig {
            steps: 40,
            batch_size: 8,
            lr: 3e-3,
            warmup: 5,
            ckpt_every: 20,
            class_dropout: 0.0,
            ..Default::default()
        };
        let mut losses = Vec::new();
        let mut cks = Vec::new();
        train_gpt(
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
        // resume for 10 more steps: starts from the saved step, keeps the learned weights
        let tcfg2 = GptTrainConfig { steps: 50, ..tcfg };
        let mut resumed = Vec::new();
        train_gpt(
            &cfg,
            &tcfg2,
            &data,
            &data,
            &dir,
            true,
            &Device::Cpu,
            &mut |s, l| resumed.push((s, l)),
            &mut |_, _| Ok(()),
        )?;
        assert_eq!(resumed.first().map(|r| r.0), Some(41));
        assert!(resumed[0].1 < 0.6 * losses[0]);
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
}
