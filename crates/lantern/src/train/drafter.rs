//! Training the EAGLE drafter on distilled target features (spec §6.3, LANTERN's recipe):
//! frozen token embedding copied from the target, frozen target `lm_head`, loss
//! `SmoothL1(pred, next feature) + 0.1 · CE(softmax(head(next feature)), log_softmax(head(pred)))`,
//! uniform noise on the input features, AdamW (betas 0.9/0.95), gradient clipping by value,
//! linear warm-up then linear decay to zero.
//!
//! Alignment (c2i, target `cls_token_num` 1, drafter `cls_token_num` 0): drafter position `j`
//! holds (target feature at target position `j`, token at target position `j + 1` = `t_j`) and
//! uses RoPE row `j` = grid cell `j`; its output is trained towards the target feature at
//! position `j + 1` (the one that predicts `t_{j+1}`). With the chunk layout of
//! [`super::distill`] (`features[:, i]` predicts `tokens[:, i]`) the inputs are
//! `(features[:, j], tokens[:, j])` and the target is `features[:, j + 1]`, `j = 0..L-1`.
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::distill::{DrafterChunk, DrafterData};
use super::{save_checkpoint, LossLog, TrainProgress, TrainState};
use crate::models::drafter::{Drafter, DrafterConfig};
use crate::models::llamagen::{Config, LlamaGen};
use crate::{Error, Result};

/// Which target table initialises the (frozen) drafter embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EmbedInit {
    /// The target's output matrix `output.weight` (what LANTERN's code loads, spec §6.3).
    LmHead,
    /// The target's input embedding `tok_embeddings.weight`.
    TokEmbeddings,
}

/// Settings of a drafter training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrafterTrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (PyTorch default 0.01).
    pub weight_decay: f64,
    /// Linear warm-up steps (then linear decay to 0 at `steps`).
    pub warmup: usize,
    /// Clip every gradient entry to `[-clip, clip]` (`0` = off).
    pub clip_value: f64,
    /// Noise `std` of LANTERN: inputs get `U(-0.5, 0.5) · std · 512 / seq_len` added,
    /// seq_len = condition + image positions of the target.
    pub noise_std: f64,
    /// Weight of the cross-entropy term.
    pub p_weight: f64,
    /// Last chunks held out for evaluation (none when the folder has no more chunks than this).
    pub holdout_chunks: usize,
    /// Held-out sequences evaluated at each checkpoint.
    pub eval_sequences: usize,
    /// Steps between checkpoints (and evaluations).
    pub ckpt_every: usize,
    /// Steps between progress reports.
    pub log_every: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// Source of the embedding.
    pub embed_init: EmbedInit,
    /// Stop with a checkpoint once this much wall time has passed (resume later).
    pub time_limit_s: Option<f64>,
}

impl Default for DrafterTrainConfig {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch_size: 16,
            lr: 3e-4,
            weight_decay: 0.01,
            warmup: 300,
            clip_value: 0.5,
            noise_std: 0.2,
            p_weight: 0.1,
            holdout_chunks: 1,
            eval_sequences: 64,
            ckpt_every: 1000,
            log_every: 50,
            seed: 0,
            embed_init: EmbedInit::LmHead,
            time_limit_s: None,
        }
    }
}

/// What a run reports at each checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct DrafterCheckpoint {
    /// Optimiser step.
    pub step: usize,
    /// Mean training loss since the previous checkpoint, and its two terms.
    pub loss: f64,
    pub vloss: f64,
    pub ploss: f64,
    /// Held-out top-1 / top-10 agreement with the target's argmax (conditional sequences).
    pub top1: f64,
    pub topk: f64,
}

/// A drafter config matching `target` (same width, heads, FFN and grid; c2i positions).
pub fn drafter_config_for(target: &Config) -> DrafterConfig {
    DrafterConfig {
        hidden_size: target.dim,
        intermediate_size: target.ffn_hidden,
        num_attention_heads: target.n_head,
        num_key_value_heads: target.n_kv_head,
        vocab_size: target.vocab_size,
        rms_norm_eps: 1e-6,
        cls_token_num: target.cls_token_num.saturating_sub(1),
        block_size: target.block_size,
        input_type: "c2i".into(),
        rope_base: target.rope_base,
        extra_rope_rows: 20,
    }
}

/// HF-style `config.json` of a drafter (readable by [`DrafterConfig::from_hf_value`]).
pub fn drafter_config_json(cfg: &DrafterConfig) -> Result<String> {
    let mut v = serde_json::to_value(cfg).map_err(|e| Error::invalid("config", e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        m.insert("num_hidden_layers".into(), 1.into());
        m.insert("hidden_act".into(), "silu".into());
        m.insert("tie_word_embeddings".into(), false.into());
        m.insert("torch_dtype".into(), "float32".into());
    }
    serde_json::to_string_pretty(&v).map_err(|e| Error::invalid("config", e.to_string()))
}

/// The target's output matrix `[vocab, dim]` in f32 on `device` (read through `lm_head`).
pub fn target_head(target: &LlamaGen, device: &Device) -> Result<Tensor> {
    let d = target.config().dim;
    let eye = Tensor::eye(d, DType::F32, target.device())?.unsqueeze(0)?;
    let w = target.lm_head(&eye)?.squeeze(0)?.t()?.contiguous()?;
    Ok(w.to_device(device)?)
}

/// Training inputs of sequences `idx` of a chunk: next tokens `[b, L-1]` u32, input features
/// `[b, L-1, dim]` and target features `[b, L-1, dim]` (f32 on `device`).
pub fn drafter_batch(
    chunk: &DrafterChunk,
    idx: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let sel = Tensor::from_vec(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        idx.len(),
        &Device::Cpu,
    )?;
    let l = chunk.tokens.dim(1)?;
    let f = chunk
        .features
        .index_select(&sel, 0)?
        .to_dtype(DType::F32)?
        .to_device(device)?;
    let toks = chunk.tokens.index_select(&sel, 0)?.to_device(device)?;
    Ok((
        toks.narrow(1, 0, l - 1)?,
        f.narrow(1, 0, l - 1)?,
        f.narrow(1, 1, l - 1)?,
    ))
}

fn positions(cfg: &DrafterConfig, s: usize, device: &Device) -> Result<Tensor> {
    let c = cfg.cls_token_num as u32;
    Ok(Tensor::arange(c, c + s as u32, device)?)
}

/// SmoothL1 (β = 1), elementwise.
fn smooth_l1(pred: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let d = (pred - target)?.abs()?;
    let q = d.minimum(1.0)?;
    q.mul(&(d - (&q * 0.5)?)?)
}

/// (total, vloss, ploss) of drafter outputs `pred` against target features (`head` `[V, d]`).
fn drafter_loss(
    pred: &Tensor,
    target: &Tensor,
    head: &Tensor,
    p_weight: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, d) = pred.dims3()?;
    let vloss = smooth_l1(pred, target)?.mean_all()?;
    let ht = head.t()?;
    let tl = target.reshape((b * s, d))?.matmul(&ht)?;
    let tp = candle_nn::ops::softmax_last_dim(&tl)?.detach();
    let pl = candle_nn::ops::log_softmax(&pred.reshape((b * s, d))?.matmul(&ht)?, D::Minus1)?;
    let ploss = (tp * pl)?.sum(D::Minus1)?.mean_all()?.neg()?;
    let total = (&vloss + (&ploss * p_weight)?)?;
    Ok((total, vloss, ploss))
}

/// Learning rate at `step`: linear warm-up, then linear decay to 0 at `steps`.
pub fn linear_lr(cfg: &DrafterTrainConfig, step: usize) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup).max(1) as f64;
    cfg.lr * (1.0 - (step - cfg.warmup) as f64 / span).max(0.0)
}

/// Batches of one epoch over `chunks`: (chunk, sequence indices), shuffled by `seed`.
fn epoch_plan(
    data: &DrafterData,
    chunks: &[usize],
    batch: usize,
    seed: u64,
) -> Vec<(usize, Vec<usize>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order = chunks.to_vec();
    order.shuffle(&mut rng);
    let mut plan = Vec::new();
    for c in order {
        let n = data.chunk_len(c);
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut rng);
        if n < batch {
            plan.push((c, idx));
            continue;
        }
        for b in idx.chunks_exact(batch) {
            plan.push((c, b.to_vec()));
        }
    }
    plan
}

/// Splits the folder's chunks into (train, held-out): the last `holdout` chunks of real
/// sequences are held out (none when there are no more real chunks than that); self-generated
/// chunks always train.
pub fn split_chunks(data: &DrafterData, holdout: usize) -> (Vec<usize>, Vec<usize>) {
    let real: Vec<usize> = data
        .chunks
        .iter()
        .copied()
        .filter(|&c| c < data.manifest.real_chunks())
        .collect();
    if real.len() <= holdout {
        return (data.chunks.clone(), Vec::new());
    }
    let held = real[real.len() - holdout..].to_vec();
    let train = data
        .chunks
        .iter()
        .copied()
        .filter(|c| !held.contains(c))
        .collect();
    (train, held)
}

/// Trains (or resumes from `out/train_state.json`) a drafter for `target` on the folder written
/// by [`super::distill::distill`]. Checkpoints go to `out` (`model.safetensors`, HF-style
/// `config.json`, `train_state.json`, `losses.csv`), loadable with [`crate::load::load_drafter`].
/// Optimiser moments are not saved: a resumed run restarts them.
#[allow(clippy::too_many_arguments)]
pub fn train_drafter(
    target: &LlamaGen,
    drafter_cfg: &DrafterConfig,
    data_dir: &Path,
    out: &Path,
    tcfg: &DrafterTrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(&TrainProgress),
    on_checkpoint: &mut dyn FnMut(&Drafter, &DrafterCheckpoint) -> Result<()>,
) -> Result<(VarMap, Drafter)> {
    let start_time = Instant::now();
    let tc = target.config();
    let data = DrafterData::open(data_dir)?;
    let m = &data.manifest;
    if m.dim != tc.dim || m.seq_len != tc.block_size || m.vocab_size != tc.vocab_size {
        return Err(Error::invalid(
            "drafter data",
            format!(
                "{} was distilled from another target (width {}, {} tokens); rerun distill with this target",
                data_dir.display(), m.dim, m.seq_len
            ),
        ));
    }
    if tcfg.batch_size == 0 || tcfg.ckpt_every == 0 || m.seq_len < 2 {
        return Err(Error::invalid(
            "drafter training",
            "batch_size and ckpt_every must be at least 1",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Write {
        path: out.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    // `Drafter::load` concatenates q/k/v into one matrix: a model built from the variables is a
    // snapshot, so it is rebuilt after every optimiser step.
    let build = || Drafter::load(vb.clone(), drafter_cfg);
    build()?.check_target(tc)?;
    let head = target_head(target, device)?;
    let config_json = drafter_config_json(drafter_cfg)?;
    let mut start = 0usize;
    if let Some(state) = TrainState::read(out)? {
        let cpath = out.join("config.json");
        let old = DrafterConfig::from_hf_json(&cpath)?;
        if &old != drafter_cfg {
            return Err(Error::invalid(
                "drafter training",
                format!(
                    "{} holds a drafter with another config; use a new output folder",
                    out.display()
                ),
            ));
        }
        varmap.load(out.join("model.safetensors"))?;
        start = state.step;
    } else {
        let emb = match tcfg.embed_init {
            EmbedInit::LmHead => head.clone(),
            EmbedInit::TokEmbeddings => {
                let ids = Tensor::arange(0u32, tc.vocab_size as u32, target.device())?;
                target
                    .embed_tokens(&ids)?
                    .to_dtype(DType::F32)?
                    .to_device(device)?
            }
        };
        varmap.set_one("embed_tokens.weight", emb)?;
    }
    let trainable: Vec<candle_core::Var> = {
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| Error::invalid("variables", "lock poisoned"))?;
        let mut names: Vec<&String> = vars
            .keys()
            .filter(|k| !k.starts_with("embed_tokens"))
            .collect();
        names.sort();
        names.into_iter().map(|k| vars[k].clone()).collect()
    };
    let mut opt = candle_nn::AdamW::new(
        trainable.clone(),
        candle_nn::ParamsAdamW {
            lr: tcfg.lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: tcfg.weight_decay,
        },
    )?;
    let (train_chunks, held) = split_chunks(&data, tcfg.holdout_chunks);
    let eval_chunks = if held.is_empty() {
        train_chunks.clone()
    } else {
        held
    };
    let mut log = LossLog::open(
        &out.join("losses.csv"),
        &["step", "lr", "loss", "vloss", "ploss", "top1", "top10"],
        start > 0,
    )?;
    let noise = tcfg.noise_std * 512.0 / (tc.cls_token_num + tc.block_size) as f64;
    let spe = epoch_plan(&data, &train_chunks, tcfg.batch_size, 0)
        .len()
        .max(1);
    let mut plan = Vec::new();
    let mut plan_epoch = usize::MAX;
    let mut loaded: Option<(usize, DrafterChunk)> = None;
    let (mut acc, mut acc_v, mut acc_p, mut acc_n) = (0f64, 0f64, 0f64, 0usize);
    for step in start..tcfg.steps {
        let epoch = step / spe;
        if epoch != plan_epoch {
            plan = epoch_plan(
                &data,
                &train_chunks,
                tcfg.batch_size,
                tcfg.seed.wrapping_add(epoch as u64),
            );
            plan_epoch = epoch;
        }
        let (c, idx) = &plan[(step % spe).min(plan.len() - 1)];
        if loaded.as_ref().map(|(lc, _)| *lc) != Some(*c) {
            drop(loaded.take()); // free the previous chunk before reading the next
            loaded = Some((*c, data.load_chunk(*c)?));
        }
        let Some((_, chunk)) = &loaded else {
            continue;
        };
        let (ids, inputs, targets) = drafter_batch(chunk, idx, device)?;
        let inputs = if noise > 0.0 {
            let u = Tensor::rand(-0.5f32, 0.5f32, inputs.shape(), device)?;
            (inputs + (u * noise)?)?
        } else {
            inputs
        };
        let pos = positions(drafter_cfg, ids.dim(1)?, device)?;
        let pred = build()?.forward_train(&ids, &inputs, &pos)?;
        let (loss, vloss, ploss) = drafter_loss(&pred, &targets, &head, tcfg.p_weight)?;
        let lr = linear_lr(tcfg, step);
        opt.set_learning_rate(lr);
        let mut grads = loss.backward()?;
        if tcfg.clip_value > 0.0 {
            for v in &trainable {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let g = g.clamp(-tcfg.clip_value, tcfg.clip_value)?;
                    grads.insert(v.as_tensor(), g);
                }
            }
        }
        opt.step(&grads)?;
        let last_loss = loss.to_scalar::<f32>()? as f64;
        acc += last_loss;
        acc_v += vloss.to_scalar::<f32>()? as f64;
        acc_p += ploss.to_scalar::<f32>()? as f64;
        acc_n += 1;
        let done = step + 1;
        if done % tcfg.log_every.max(1) == 0 || done == tcfg.steps {
            progress(&TrainProgress {
                step: done,
                steps: tcfg.steps,
                loss: last_loss,
                lr,
                elapsed_s: start_time.elapsed().as_secs_f64(),
            });
        }
        let out_of_time = tcfg
            .time_limit_s
            .is_some_and(|t| start_time.elapsed().as_secs_f64() >= t);
        if done % tcfg.ckpt_every == 0 || done == tcfg.steps || out_of_time {
            loaded = None;
            let drafter = build()?;
            let (top1, topk) = evaluate_with_head(
                &drafter,
                &head,
                &data,
                &eval_chunks,
                tcfg.eval_sequences,
                10,
            )?;
            let k = acc_n.max(1) as f64;
            let ck = DrafterCheckpoint {
                step: done,
                loss: acc / k,
                vloss: acc_v / k,
                ploss: acc_p / k,
                top1,
                topk,
            };
            log.row(done, &[lr, ck.loss, ck.vloss, ck.ploss, top1, topk])?;
            let state = TrainState {
                step: done,
                seed: tcfg.seed,
                loss: ck.loss,
            };
            save_checkpoint(out, &varmap, &config_json, &state)?;
            on_checkpoint(&drafter, &ck)?;
            (acc, acc_v, acc_p, acc_n) = (0.0, 0.0, 0.0, 0);
            if out_of_time {
                break;
            }
        }
    }
    let drafter = build()?;
    Ok((varmap, drafter))
}

/// Held-out agreement of `drafter` with the target on at most `max_sequences` conditional
/// sequences of `chunks`: (top-1, top-k) = fraction of positions where the target's argmax at
/// the next position equals the drafter's argmax / lies in the drafter's top-`k` (both through
/// the target `lm_head`, no CFG, no noise).
pub fn evaluate_drafter(
    drafter: &Drafter,
    target: &LlamaGen,
    data: &DrafterData,
    chunks: &[usize],
    max_sequences: usize,
    k: usize,
) -> Result<(f64, f64)> {
    let head = target_head(target, target.device())?;
    evaluate_with_head(drafter, &head, data, chunks, max_sequences, k)
}

fn evaluate_with_head(
    drafter: &Drafter,
    head: &Tensor,
    data: &DrafterData,
    chunks: &[usize],
    max_sequences: usize,
    k: usize,
) -> Result<(f64, f64)> {
    let dev = head.device().clone();
    let null = data.manifest.null_class;
    let (mut hit1, mut hitk, mut total, mut seen) = (0f64, 0f64, 0f64, 0usize);
    for r in data.iter(chunks) {
        let (_, chunk) = r?;
        let cond: Vec<usize> = (0..chunk.labels.len())
            .filter(|&i| chunk.labels[i] != null)
            .take(max_sequences.saturating_sub(seen))
            .collect();
        for idx in cond.chunks(16) {
            let (ids, inputs, targets) = drafter_batch(&chunk, idx, &dev)?;
            let pos = positions(drafter.config(), ids.dim(1)?, &dev)?;
            let pred = drafter
                .forward_train(&ids, &inputs, &pos)?
                .to_dtype(DType::F32)?;
            let ht = head.t()?;
            let pl = pred.broadcast_matmul(&ht)?;
            let tl = targets.broadcast_matmul(&ht)?;
            let t_arg = tl.argmax_keepdim(D::Minus1)?;
            let p_arg = pl.argmax_keepdim(D::Minus1)?;
            hit1 += p_arg
                .eq(&t_arg)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            let at = pl.gather(&t_arg, D::Minus1)?;
            let rank = pl.broadcast_gt(&at)?.to_dtype(DType::F32)?.sum(D::Minus1)?;
            hitk += rank
                .lt(k as f64)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            total += t_arg.elem_count() as f64;
        }
        seen += cond.len();
        if seen >= max_sequences {
            break;
        }
    }
    if total == 0.0 {
        return Err(Error::invalid(
            "drafter evaluation",
            "no conditional sequences to evaluate; distill more data",
        ));
    }
    Ok((hit1 / total, hitk / total))
}
