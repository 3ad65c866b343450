//! `lantern train ...`: training commands.
use crate::common::{check_new_output, progress_bar, DeviceOpts};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lantern::data::{fashion_mnist, Split, FASHION_MNIST_DIR};
use lantern::eval::{train_classifier, ClassifierConfig, ClassifierTrainConfig};
use std::path::PathBuf;

/// Which model to train.
#[derive(Subcommand)]
pub enum TrainCommand {
    /// Train the evaluation classifier (small CNN) on Fashion-MNIST.
    Classifier(ClassifierArgs),
    /// Train a class-conditional LlamaGen GPT on token grids made by `lantern tokenize`.
    Gpt(GptArgs),
    /// Train a VQ tokenizer (the VQ-16 architecture family, scaled down) on Fashion-MNIST.
    Vq(VqArgs),
    /// Train an EAGLE drafter on features written by `lantern distill`.
    Drafter(DrafterArgs),
}

/// Options of `lantern train drafter`.
#[derive(Args)]
pub struct DrafterArgs {
    /// Target GPT (folder or checkpoint) whose features the drafter predicts.
    #[arg(long)]
    gpt: PathBuf,
    /// Folder written by `lantern distill`.
    #[arg(long)]
    data: PathBuf,
    /// Run folder: model.safetensors, config.json, train_state.json, losses.csv.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 10000)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (linear warm-up, then linear decay).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Steps between checkpoints (and held-out accuracy).
    #[arg(long, default_value_t = 1000)]
    ckpt_every: usize,
    /// Continue from the checkpoint in OUT.
    #[arg(long)]
    resume: bool,
    /// Stop (with a checkpoint) after this many seconds.
    #[arg(long)]
    time_limit_s: Option<f64>,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Options of `lantern train vq`.
#[derive(Args)]
pub struct VqArgs {
    /// Run folder: config.json, model.safetensors, train_state.json, losses.csv, recon_*.png.
    #[arg(long)]
    out: PathBuf,
    /// Fashion-MNIST folder (Debian's dataset-fashion-mnist layout).
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 4000)]
    steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Codebook size.
    #[arg(long, default_value_t = 1024)]
    codebook_size: usize,
    /// Base channel count.
    #[arg(long)]
    ch: Option<usize>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 1000)]
    ckpt_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint in OUT.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Options of `lantern train gpt`.
#[derive(Args)]
pub struct GptArgs {
    /// Training token grids (`lantern tokenize` output).
    #[arg(long)]
    tokens: PathBuf,
    /// Held-out token grids for the test loss.
    #[arg(long)]
    test_tokens: PathBuf,
    /// Run folder: checkpoints, losses.csv, train_state.json; the final f16 export goes to OUT/export.
    #[arg(long)]
    out: PathBuf,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    dim: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 10000)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 1000)]
    ckpt_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint in OUT.
    #[arg(long)]
    resume: bool,
    /// Allow writing into an existing run folder without --resume (starts over).
    #[arg(long)]
    force: bool,
    /// Stop (with a checkpoint) once this many seconds have passed; resume later with --resume.
    #[arg(long)]
    time_limit_s: Option<f64>,
    /// VQ tokenizer of the tokens: when given, each checkpoint also writes `samples_<step>.png`
    /// (one AR sample per class, CFG 2).
    #[arg(long)]
    vq: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Options of `lantern train classifier`.
#[derive(Args)]
pub struct ClassifierArgs {
    /// Output folder (config.json + model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Fashion-MNIST folder (Debian's dataset-fashion-mnist layout).
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Passes over the 60k training images.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Learning rate (AdamW, cosine decay).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seed for shuffling and initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Overwrite an existing output folder.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Runs a training command.
pub fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Classifier(a) => classifier(a),
        TrainCommand::Gpt(a) => gpt(a),
        TrainCommand::Vq(a) => vq(a),
        TrainCommand::Drafter(a) => drafter(a),
    }
}

fn classifier(a: ClassifierArgs) -> Result<()> {
    check_new_output(&a.out.join("model.safetensors"), a.force)?;
    let dev = a.device.device()?;
    let train = fashion_mnist(&a.data, Split::Train)?;
    let test = fashion_mnist(&a.data, Split::Test)?;
    let cfg = ClassifierConfig::fashion_mnist();
    let tcfg = ClassifierTrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
    };
    let pb = progress_bar(
        (train.len().div_ceil(a.batch_size) * a.epochs) as u64,
        "train classifier",
    );
    let start = std::time::Instant::now();
    let (varmap, model) =
        train_classifier(&cfg, &tcfg, &train, &dev, &mut |step, _total, loss| {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.4}"));
        })?;
    pb.finish();
    let (_, pred) = model.predict(&test, &dev)?;
    let correct = pred
        .iter()
        .zip(&test.labels)
        .filter(|(p, l)| p == l)
        .count();
    let acc = correct as f64 / test.len() as f64;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    lantern::train::save_varmap_f16(&varmap, &a.out.join("model.safetensors"))?;
    std::fs::write(
        a.out.join("config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    println!(
        "classifier: test accuracy {:.2}% on {} images, trained {} epochs in {:.0} s; saved to {}",
        100.0 * acc,
        test.len(),
        a.epochs,
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

fn gpt(a: GptArgs) -> Result<()> {
    use lantern::data::TokenDataset;
    use lantern::models::llamagen::{Config, ModelType};
    use lantern::train::gpt::{train_gpt, GptTrainConfig, LEGACY_STATE_FILE};
    use lantern::train::TrainState;
    if !a.resume {
        for state in [TrainState::FILE, LEGACY_STATE_FILE] {
            check_new_output(&a.out.join(state), a.force)?;
        }
    }
    let dev = a.device.device()?;
    let train = TokenDataset::load(&a.tokens)?;
    let test = TokenDataset::load(&a.test_tokens)?;
    let num_classes = train.labels.iter().max().map_or(1, |m| *m as usize + 1);
    let cfg = Config {
        dim: a.dim,
        n_layer: a.layers,
        n_head: a.heads,
        n_kv_head: a.heads,
        vocab_size: train.vocab,
        ffn_hidden: lantern::models::llamagen::config::default_ffn_hidden(a.dim),
        rope_base: 10000.0,
        norm_eps: 1e-5,
        model_type: ModelType::C2i,
        num_classes,
        caption_dim: 2048,
        cls_token_num: 1,
        block_size: train.seq_len(),
        extra_rope_rows: 0,
    };
    let tcfg = GptTrainConfig {
        time_limit_s: a.time_limit_s,
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        warmup: a.warmup,
        ckpt_every: a.ckpt_every,
        seed: a.seed,
        ..Default::default()
    };
    println!(
        "training GPT: {} parameters, {} train / {} test images, {} steps of {} on {:?}",
        cfg.param_count(),
        train.len(),
        test.len(),
        a.steps,
        a.batch_size,
        dev
    );
    let vq = match &a.vq {
        Some(p) => Some(lantern::models::vq::VqModel::load_dir(p, &dev)?),
        None => None,
    };
    let pb = progress_bar(a.steps as u64, "train gpt");
    let start = std::time::Instant::now();
    let model = train_gpt(
        &cfg,
        &tcfg,
        &train,
        &test,
        &a.out,
        a.resume,
        &dev,
        &mut |step, loss| {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.4}"));
        },
        &mut |model, ck| {
            pb.println(format!(
                "step {}: train loss {:.4}, test cross-entropy {:.4} nats/token ({:.0} s)",
                ck.step,
                ck.train_loss,
                ck.test_loss,
                start.elapsed().as_secs_f64()
            ));
            if let Some(vq) = &vq {
                let png = a.out.join(format!("samples_{:06}.png", ck.step));
                checkpoint_samples(model, vq, &png)?;
            }
            Ok(())
        },
    )?;
    pb.finish();
    drop(model);
    let export = a.out.join("export");
    lantern::train::gpt::export_f16(&a.out, &cfg, &export)?;
    println!(
        "done in {:.0} s; checkpoint in {}, f16 model folder in {}",
        start.elapsed().as_secs_f64(),
        a.out.display(),
        export.display()
    );
    Ok(())
}

fn vq(a: VqArgs) -> Result<()> {
    use lantern::models::vq::VqConfig;
    use lantern::train::vq::{train_vq, VqTrainConfig};
    let dev = a.device.device()?;
    let train = fashion_mnist(&a.data, Split::Train)?;
    let test = fashion_mnist(&a.data, Split::Test)?;
    let mut cfg = VqConfig::fashion_small();
    cfg.codebook_size = a.codebook_size;
    if let Some(ch) = a.ch {
        cfg.ch = ch;
    }
    let tcfg = VqTrainConfig::new(a.steps, &a.out)
        .with_batch_size(a.batch_size)
        .with_lr(a.lr)
        .with_ckpt_every(a.ckpt_every)
        .with_seed(a.seed)
        .with_resume(a.resume);
    let pb = progress_bar(a.steps as u64, "train vq");
    let report = train_vq(&cfg, &tcfg, &train, &test, &dev, &mut |p| {
        pb.set_position(p.step as u64);
        pb.set_message(format!("loss {:.4}", p.loss));
    })?;
    pb.finish();
    println!(
        "vq: {} steps, test PSNR {:.2} dB, codebook usage {:.1}%, {:.3} s/step; saved to {}",
        report.steps,
        report.test_psnr,
        100.0 * report.code_usage,
        report.seconds_per_step,
        a.out.display()
    );
    Ok(())
}

fn drafter(a: DrafterArgs) -> Result<()> {
    use lantern::train::drafter::{drafter_config_for, train_drafter, DrafterTrainConfig};
    let dev = a.device.device()?;
    let (target, _) = lantern::load::load_llamagen(&a.gpt, None, candle_core::DType::F32, &dev)?;
    let dcfg = drafter_config_for(target.config());
    let tcfg = DrafterTrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        ckpt_every: a.ckpt_every,
        time_limit_s: a.time_limit_s,
        ..Default::default()
    };
    if !a.resume {
        check_new_output(&a.out.join("train_state.json"), false).map_err(|_| {
            anyhow::anyhow!(
                "{} holds a run already: pass --resume to continue it or choose another --out",
                a.out.display()
            )
        })?;
    }
    let pb = progress_bar(a.steps as u64, "train drafter");
    let start = std::time::Instant::now();
    train_drafter(
        &target,
        &dcfg,
        &a.data,
        &a.out,
        &tcfg,
        &dev,
        &mut |p| {
            pb.set_position(p.step as u64);
            pb.set_message(format!("loss {:.4}", p.loss));
        },
        &mut |_, ck| {
            pb.println(format!(
                "step {}: loss {:.4} (feature {:.4}, token {:.4}), held-out top-1 {:.3}, top-10 {:.3} ({:.0} s)",
                ck.step,
                ck.loss,
                ck.vloss,
                ck.ploss,
                ck.top1,
                ck.topk,
                start.elapsed().as_secs_f64()
            ));
            Ok(())
        },
    )?;
    pb.finish();
    println!(
        "drafter trained in {:.0} s: {}",
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// One AR sample per class (CFG 2, temperature 1, seed 0) decoded into a PNG grid.
fn checkpoint_samples(
    model: &lantern::models::llamagen::LlamaGen,
    vq: &lantern::models::vq::VqModel,
    png: &std::path::Path,
) -> lantern::Result<()> {
    use lantern::decode::GenerateOptions;
    use lantern::models::llamagen::Condition;
    let classes: Vec<u32> = (0..model.config().num_classes as u32).collect();
    let opts = GenerateOptions::new().with_cfg_scale(2.0).with_seed(0);
    let out =
        lantern::decode::llamagen::generate(model, None, &Condition::Classes(classes), &opts)?;
    let side = (model.config().block_size as f64).sqrt() as usize;
    let flat: Vec<u32> = out.tokens.iter().flatten().copied().collect();
    let codes = candle_core::Tensor::from_vec(flat, (out.tokens.len(), side * side), vq.device())?;
    let imgs = vq.decode_codes(&codes, (side, side))?;
    let (_, c, h, w) = imgs.dims4()?;
    let pixels = lantern::image::to_u8(&imgs)?;
    lantern::image::save_grid(png, &pixels, w, h, c, pixels.len(), true)
}
