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
