//! Training of small VQ tokenizers (e.g. on Fashion-MNIST).
//!
//! As LlamaGen's VQ training minus the perceptual and GAN losses: reconstruction MSE (plus an
//! optional L1 term), codebook loss and `beta` x commitment loss on l2-normalised vectors, an
//! optional entropy loss, straight-through gradients, AdamW with warm-up and cosine decay.
//! Images are centred on a `pad_to x pad_to` canvas filled with black (-1), so Fashion-MNIST's
//! 28x28 becomes 32x32 and a two-level model gives a 16x16 token grid.
use super::{cosine_lr, save_checkpoint, LossLog, TrainProgress, TrainState};
use crate::data::ImageDataset;
use crate::models::vq::{VqConfig, VqModel};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

/// Options of [`train_vq`]; build with [`VqTrainConfig::new`] and the `with_*` setters.
#[derive(Debug, Clone)]
pub struct VqTrainConfig {
    /// Total optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Weight of the commitment loss (0.25 in LlamaGen).
    pub beta_commit: f64,
    /// Weight of the codebook loss (1.0 in LlamaGen).
    pub codebook_weight: f64,
    /// Weight of the entropy loss (0 = off, LlamaGen's default).
    pub entropy_weight: f64,
    /// Weight of an extra L1 reconstruction term (0 = off).
    pub l1_weight: f64,
    /// Report progress and write a `losses.csv` row every this many steps.
    pub log_every: usize,
    /// Write a checkpoint and a reconstruction PNG every this many steps (and at the end).
    pub ckpt_every: usize,
    /// Seed of the initial weights and the batch order.
    pub seed: u64,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Continue from the checkpoint in `out_dir`.
    pub resume: bool,
    /// Side of the square canvas the images are centred on (0 = the image size).
    pub pad_to: usize,
    /// Test images used for the PSNR / usage evaluation at the end (0 = all).
    pub eval_images: usize,
}

impl VqTrainConfig {
    /// Defaults for `steps` steps written to `out_dir`: batch 64, lr 5e-4 (warm-up 200),
    /// weight decay 0.05, beta 0.25, codebook weight 1, no entropy / L1 terms, log every 50,
    /// checkpoint every 1000, seed 0, pad to 32, evaluate on 2000 test images.
    pub fn new(steps: usize, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            steps,
            batch_size: 64,
            lr: 5e-4,
            warmup_steps: 200,
            weight_decay: 0.05,
            beta_commit: 0.25,
            codebook_weight: 1.0,
            entropy_weight: 0.0,
            l1_weight: 0.0,
            log_every: 50,
            ckpt_every: 1000,
            seed: 0,
            out_dir: out_dir.into(),
            resume: false,
            pad_to: 32,
            eval_images: 2000,
        }
    }
}

macro_rules! setters {
    ($($name:ident : $field:ident : $ty:ty),* $(,)?) => {
        impl VqTrainConfig {
            $(
                #[doc = concat!("Sets `", stringify!($field), "`.")]
                pub fn $name(mut self, v: $ty) -> Self {
                    self.$field = v;
                    self
                }
            )*
        }
    };
}

setters!(
    with_batch_size: batch_size: usize,
    with_lr: lr: f64,
    with_warmup_steps: warmup_steps: usize,
    with_weight_decay: weight_decay: f64,
    with_beta_commit: beta_commit: f64,
    with_codebook_weight: codebook_weight: f64,
    with_entropy_weight: entropy_weight: f64,
    with_l1_weight: l1_weight: f64,
    with_log_every: log_every: usize,
    with_ckpt_every: ckpt_every: usize,
    with_seed: seed: u64,
    with_resume: resume: bool,
    with_pad_to: pad_to: usize,
    with_eval_images: eval_images: usize,
);

/// Outcome of a training run.
#[derive(Debug, Clone)]
pub struct VqTrainReport {
    /// Steps completed (including those of a resumed run).
    pub steps: usize,
    /// Total loss of the last step.
    pub final_loss: f64,
    /// Reconstruction PSNR on the test images (dB, peak = full [-1, 1] range).
    pub test_psnr: f64,
    /// Share of codebook entries used when encoding the test images.
    pub code_usage: f64,
    /// Mean wall time of one training step in this run (seconds).
    pub seconds_per_step: f64,
}

/// Images `idx` of `data` as a `[n, c, pad, pad]` f32 batch in [-1, 1], centred on a black
/// canvas.
pub fn batch_tensor(
    data: &ImageDataset,
    idx: &[usize],
    pad: usize,
    device: &Device,
) -> Result<Tensor> {
    let (h, w, c) = (data.height, data.width, data.channels);
    let pad = pad.max(h).max(w);
    let (top, left) = ((pad - h) / 2, (pad - w) / 2);
    let mut buf = vec![-1f32; idx.len() * c * pad * pad];
    for (b, &i) in idx.iter().enumerate() {
        let im = data.image(i);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let v = im[(y * w + x) * c + ch] as f32 / 127.5 - 1.0;
                    buf[((b * c + ch) * pad + top + y) * pad + left + x] = v;
                }
            }
        }
    }
    Ok(Tensor::from_vec(buf, (idx.len(), c, pad, pad), device)?)
}

fn check_compatible(cfg: &VqConfig, data: &ImageDataset, pad: usize) -> Result<()> {
    if data.is_empty() {
        return Err(Error::invalid("training data", "no images"));
    }
    if data.channels != cfg.in_channels {
        return Err(Error::invalid(
            "training data",
            format!(
                "images have {} channels but the VQ config has in_channels {}",
                data.channels, cfg.in_channels
            ),
        ));
    }
    let side = pad.max(data.height).max(data.width);
    if !side.is_multiple_of(cfg.downsample()) {
        return Err(Error::invalid(
            "pad_to",
            format!(
                "canvas {side} is not a multiple of the downsampling factor {}; pad to e.g. {}",
                cfg.downsample(),
                side.div_ceil(cfg.downsample()) * cfg.downsample()
            ),
        ));
    }
    Ok(())
}

/// Re-initialises the trainable weights from `seed` (candle cannot seed its CPU generator):
/// conv weights Kaiming-normal (`sqrt(2 / fan_in)`), conv biases `U(±1/sqrt(fan_in))`, the
/// codebook `U(±1/V)`; GroupNorm scales and shifts keep their constant 1 / 0.
fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("training", "weight map lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = if name.ends_with("embedding.weight") {
            let b = 1.0 / dims[0] as f32;
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        } else if dims.len() == 4 {
            let std = (2.0 / (dims[1] * dims[2] * dims[3]) as f32).sqrt();
            (0..n)
                .map(|_| {
                    // Box-Muller.
                    let u1: f32 = rng.random::<f32>().max(1e-7);
                    let u2: f32 = rng.random();
                    std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect()
        } else if name.ends_with(".bias") {
            let wname = format!("{}.weight", name.trim_end_matches(".bias"));
            match data.get(&wname).map(|w| w.dims().to_vec()) {
                Some(wd) if wd.len() == 4 => {
                    let b = 1.0 / ((wd[1] * wd[2] * wd[3]) as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-b..b)).collect()
                }
                _ => continue,
            }
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(vals, dims, var.device())?)?;
    }
    Ok(())
}

/// LlamaGen's entropy loss (temperature 0.01): mean per-sample entropy minus the entropy of
/// the mean code distribution, from squared distances `[n, V]`.
fn entropy_loss(dist: &Tensor) -> candle_core::Result<Tensor> {
    let logits = (dist.neg()? / 0.01)?;
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let log_probs = candle_nn::ops::log_softmax(&(logits + 1e-5)?, D::Minus1)?;
    let avg = probs.mean(0)?;
    let avg_entropy = (&avg * (&avg + 1e-5)?.log()?)?.sum_all()?.neg()?;
    let sample_entropy = (probs * log_probs)?.sum(D::Minus1)?.mean_all()?.neg()?;
    sample_entropy - avg_entropy
}

/// Trains a VQ model from scratch (or resumes one) on `data`, evaluates it on `test`, and
/// leaves `config.json`, `model.safetensors`, `train_state.json`, `losses.csv` and
/// `recon_<step>.png` (test images above their reconstructions) in `tcfg.out_dir`.
pub fn train_vq(
    cfg: &VqConfig,
    tcfg: &VqTrainConfig,
    data: &ImageDataset,
    test: &ImageDataset,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<VqTrainReport> {
    cfg.validate()?;
    check_compatible(cfg, data, tcfg.pad_to)?;
    check_compatible(cfg, test, tcfg.pad_to)?;
    if tcfg.steps == 0 || tcfg.batch_size == 0 {
        return Err(Error::invalid(
            "training",
            "steps and batch_size must be > 0",
        ));
    }
    let out = &tcfg.out_dir;
    let state = TrainState::read(out)?;
    if state.is_some() && !tcfg.resume {
        return Err(Error::invalid(
            "output folder",
            format!(
                "{} already holds a training run; pass --resume to continue it or choose another folder",
                out.display()
            ),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Write {
        path: out.clone(),
        msg: format!("{e} (cannot create the output folder)"),
    })?;

    let varmap = VarMap::new();
    let model = VqModel::load(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    seeded_init(&varmap, tcfg.seed)?;
    let mut start = 0;
    if let Some(st) = &state {
        let saved = out.join("config.json");
        let text =
            std::fs::read_to_string(&saved).map_err(|e| Error::load(&saved, e.to_string()))?;
        if VqConfig::from_json(&text)? != *cfg {
            return Err(Error::load(
                &saved,
                "the saved model config differs from the requested one; resume with the same config",
            ));
        }
        let mut vm = varmap.clone();
        vm.load(out.join("model.safetensors"))
            .map_err(|e| Error::load(out.join("model.safetensors"), e.to_string()))?;
        start = st.step;
    }
    let params = ParamsAdamW {
        lr: tcfg.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: tcfg.weight_decay,
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let mut log = LossLog::open(
        &out.join("losses.csv"),
        &[
            "step", "loss", "recon", "codebook", "commit", "entropy", "lr",
        ],
        start > 0,
    )?;

    let t0 = Instant::now();
    let mut last_loss = state.as_ref().map_or(f64::NAN, |s| s.loss);
    for step in start..tcfg.steps {
        let mut rng = StdRng::seed_from_u64(tcfg.seed.wrapping_add(step as u64));
        let idx: Vec<usize> = (0..tcfg.batch_size)
            .map(|_| rng.random_range(0..data.len()))
            .collect();
        let x = batch_tensor(data, &idx, tcfg.pad_to, device)?;
        let lr = cosine_lr(step, tcfg.steps, tcfg.lr, tcfg.warmup_steps, 0.1);
        opt.set_learning_rate(lr);

        let q = model.quantize(&model.encode_latent(&x)?)?;
        let rec = model.decode_latent(&q.zq)?;
        let diff = (&rec - &x)?;
        let mut recon = diff.sqr()?.mean_all()?;
        if tcfg.l1_weight > 0.0 {
            recon = (recon + (diff.abs()?.mean_all()? * tcfg.l1_weight)?)?;
        }
        let mut loss = ((&recon + (&q.codebook_loss * tcfg.codebook_weight)?)?
            + (&q.commit_loss * tcfg.beta_commit)?)?;
        let mut ent = 0.0;
        if tcfg.entropy_weight > 0.0 {
            let e = entropy_loss(&q.dist)?;
            ent = e.to_scalar::<f32>()? as f64;
            loss = (loss + (e * tcfg.entropy_weight)?)?;
        }
        opt.backward_step(&loss)?;

        let done = step + 1;
        last_loss = loss.to_scalar::<f32>()? as f64;
        if !last_loss.is_finite() {
            return Err(Error::invalid(
                "training",
                format!("loss became {last_loss} at step {done}; lower the learning rate"),
            ));
        }
        if done % tcfg.log_every.max(1) == 0 || done == tcfg.steps {
            let vals = [
                last_loss,
                recon.to_scalar::<f32>()? as f64,
                q.codebook_loss.to_scalar::<f32>()? as f64,
                q.commit_loss.to_scalar::<f32>()? as f64,
                ent,
                lr,
            ];
            log.row(done, &vals)?;
            progress(TrainProgress {
                step: done,
                steps: tcfg.steps,
                loss: last_loss,
                lr,
                elapsed_s: t0.elapsed().as_secs_f64(),
            });
        }
        if done % tcfg.ckpt_every.max(1) == 0 || done == tcfg.steps {
            let st = TrainState {
                step: done,
                seed: tcfg.seed,
                loss: last_loss,
            };
            save_checkpoint(out, &varmap, &cfg.to_json(), &st)?;
            save_reconstructions(
                &model,
                test,
                tcfg.pad_to,
                &out.join(format!("recon_{done:06}.png")),
            )?;
        }
    }
    let ran = tcfg.steps.saturating_sub(start).max(1);
    let seconds_per_step = t0.elapsed().as_secs_f64() / ran as f64;
    let eval = if tcfg.eval_images == 0 {
        test.clone()
    } else {
        test.take(tcfg.eval_images)
    };
    let (test_psnr, code_usage) = evaluate_vq(&model, &eval, tcfg.pad_to, tcfg.batch_size)?;
    Ok(VqTrainReport {
        steps: tcfg.steps.max(start),
        final_loss: last_loss,
        test_psnr,
        code_usage,
        seconds_per_step,
    })
}

/// Reconstructs the images of `test` (centred on a `pad_to` canvas, in batches of `batch`) and
/// returns `(psnr_db, code_usage)`: PSNR over the original (uncropped) pixels with the decoded
/// values clamped to [-1, 1], and the share of codebook entries that occur in the codes.
pub fn evaluate_vq(
    model: &VqModel,
    test: &ImageDataset,
    pad_to: usize,
    batch: usize,
) -> Result<(f64, f64)> {
    check_compatible(model.config(), test, pad_to)?;
    let dev = model.device().clone();
    let (h, w) = (test.height, test.width);
    let side = pad_to.max(h).max(w);
    let (top, left) = ((side - h) / 2, (side - w) / 2);
    let grid = side / model.config().downsample();
    let mut used = vec![false; model.config().codebook_size];
    let (mut se, mut count) = (0f64, 0usize);
    let all: Vec<usize> = (0..test.len()).collect();
    for chunk in all.chunks(batch.max(1)) {
        let x = batch_tensor(test, chunk, pad_to, &dev)?;
        let codes = model.encode(&x)?;
        for c in codes.flatten_all()?.to_vec1::<u32>()? {
            used[c as usize] = true;
        }
        let rec = model
            .decode_codes(&codes, (grid, grid))?
            .clamp(-1f32, 1f32)?;
        let d = (rec - x)?.narrow(2, top, h)?.narrow(3, left, w)?;
        se += d
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        count += d.elem_count();
    }
    let mse = se / count.max(1) as f64;
    let psnr = 10.0 * (4.0 / mse.max(1e-12)).log10();
    let usage = used.iter().filter(|&&u| u).count() as f64 / used.len() as f64;
    Ok((psnr, usage))
}

/// Writes a PNG with up to 8 test images (top row) and their reconstructions (bottom row).
pub fn save_reconstructions(
    model: &VqModel,
    test: &ImageDataset,
    pad_to: usize,
    path: &std::path::Path,
) -> Result<()> {
    let n = test.len().min(8);
    let idx: Vec<usize> = (0..n).collect();
    let x = batch_tensor(test, &idx, pad_to, model.device())?;
    let side = x.dim(2)?;
    let grid = side / model.config().downsample();
    let rec = model.decode_codes(&model.encode(&x)?, (grid, grid))?;
    let mut tiles = crate::image::to_u8(&x)?;
    tiles.extend(crate::image::to_u8(&rec)?);
    crate::image::save_grid(path, &tiles, side, side, test.channels, n, true)
}
