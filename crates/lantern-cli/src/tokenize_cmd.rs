//! `lantern tokenize`: encode a dataset with a VQ tokenizer into token grids for GPT training.
use crate::common::{check_new_output, progress_bar, DeviceOpts};
use anyhow::Result;
use clap::{Args, ValueEnum};
use lantern::data::{fashion_mnist, image_folder, Split, TokenDataset, FASHION_MNIST_DIR};
use lantern::models::vq::VqModel;
use std::path::PathBuf;

/// Which split of Fashion-MNIST.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SplitArg {
    /// 60k training images.
    Train,
    /// 10k test images.
    Test,
}

/// Options of `lantern tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// VQ model folder (config.json + model.safetensors).
    #[arg(long)]
    vq: PathBuf,
    /// Output token file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Fashion-MNIST folder.
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Split to encode.
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// Encode a folder of images (one sub-folder per class) instead of Fashion-MNIST.
    #[arg(long)]
    folder: Option<PathBuf>,
    /// Canvas side the images are centred on (Fashion-MNIST's 28 px go on 32).
    #[arg(long, default_value_t = 32)]
    pad_to: usize,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Runs `lantern tokenize`.
pub fn run(a: TokenizeArgs) -> Result<()> {
    check_new_output(&a.out, a.force)?;
    let dev = a.device.device()?;
    let vq = VqModel::load_dir(&a.vq, &dev)?;
    let cfg = vq.config().clone();
    let data = match &a.folder {
        Some(dir) => image_folder(dir, a.pad_to, cfg.in_channels)?,
        None => fashion_mnist(
            &a.data,
            match a.split {
                SplitArg::Train => Split::Train,
                SplitArg::Test => Split::Test,
            },
        )?,
    };
    let side = a.pad_to.max(data.height).max(data.width) / cfg.downsample();
    let pb = progress_bar(data.len() as u64, "tokenize");
    let mut tokens = Vec::with_capacity(data.len() * side * side);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(256) {
        let x = lantern::train::vq::batch_tensor(&data, chunk, a.pad_to, &dev)?;
        let codes = vq.encode(&x)?;
        tokens.extend(codes.flatten_all()?.to_vec1::<u32>()?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish();
    let ds = TokenDataset {
        tokens,
        labels: data.labels.clone(),
        grid: (side, side),
        vocab: cfg.codebook_size,
    };
    ds.save(&a.out)?;
    println!(
        "tokenized {} images into {}x{} grids over {} codes: {}",
        ds.len(),
        side,
        side,
        ds.vocab,
        a.out.display()
    );
    Ok(())
}

/// Options of `lantern distill`.
#[derive(Args)]
pub struct DistillArgs {
    /// Target GPT (folder or checkpoint).
    #[arg(long)]
    gpt: PathBuf,
    /// Token grids of real images (`lantern tokenize` output).
    #[arg(long)]
    tokens: PathBuf,
    /// Output folder of feature chunks (resumable: existing chunks are kept).
    #[arg(long)]
    out: PathBuf,
    /// Use at most this many sequences.
    #[arg(long)]
    max_sequences: Option<usize>,
    /// Also add this many sequences sampled from the target itself.
    #[arg(long, default_value_t = 0)]
    self_generated: usize,
    /// Sequences per chunk file.
    #[arg(long, default_value_t = 256)]
    chunk_size: usize,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Runs `lantern distill`: teacher-forced target features for drafter training.
pub fn distill(a: DistillArgs) -> Result<()> {
    use lantern::train::distill::{distill, DistillConfig};
    let dev = a.device.device()?;
    let (target, _) = lantern::load::load_llamagen(&a.gpt, None, candle_core::DType::F32, &dev)?;
    let data = TokenDataset::load(&a.tokens)?;
    let cfg = DistillConfig {
        chunk_size: a.chunk_size,
        max_sequences: a.max_sequences,
        self_generated: a.self_generated,
        ..Default::default()
    };
    let pb = progress_bar(0, "distill");
    let r = distill(&target, &data, &a.out, &cfg, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish();
    println!(
        "distill: {} sequences in {} new chunks ({} kept) in {:.0} s -> {}",
        r.sequences_written,
        r.chunks_written,
        r.chunks_skipped,
        r.seconds,
        a.out.display()
    );
    Ok(())
}
