//! Small commands: `inspect`, `decode`, `neighbors`, `eval`.
use crate::common::{check_new_output, DeviceOpts};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use lantern::accept::{Metric, Neighbors};
use lantern::data::{fashion_mnist, image_folder, image_folder_side, Split, FASHION_MNIST_DIR};
use lantern::eval::{fid, Classifier, FeatureStats};
use lantern::image::{save_grid, save_png, to_u8, TokenFile};
use lantern::models::vq::VqModel;
use std::path::{Path, PathBuf};

/// Options of `lantern inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint file or model folder.
    path: PathBuf,
}

/// Prints what kind of checkpoint a file is, the config it implies, its size and dtype.
pub fn inspect(a: InspectArgs) -> Result<()> {
    let info = lantern::load::inspect(&a.path)?;
    println!("{info}");
    Ok(())
}

/// Loads a VQ model from our folder layout or a `.pt`.
pub fn load_vq(path: &Path, dev: &candle_core::Device) -> Result<VqModel> {
    Ok(lantern::bundle::load_vq(path, dev)?)
}

/// Options of `lantern decode`.
#[derive(Args)]
pub struct DecodeArgs {
    /// VQ model (folder, or an official vq_ds16_*.pt).
    #[arg(long)]
    vq: PathBuf,
    /// Token file written by `lantern generate --save-tokens`.
    #[arg(long)]
    tokens: PathBuf,
    /// Output folder for the PNGs.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing PNGs.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Decodes token grids back to PNG images (one per image plus a grid).
pub fn decode(a: DecodeArgs) -> Result<()> {
    let dev = a.device.device()?;
    let vq = load_vq(&a.vq, &dev)?;
    let tf = TokenFile::read(&a.tokens, vq.config().codebook_size)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let codes = tf.to_tensor(&dev)?;
    let imgs = vq.decode_codes(&codes, (tf.grid[0], tf.grid[1]))?;
    let (_, c, h, w) = imgs.dims4()?;
    let pixels = to_u8(&imgs)?;
    for (i, p) in pixels.iter().enumerate() {
        save_png(&a.out.join(format!("{i:04}.png")), p, w, h, c, a.force)?;
    }
    let cols = (pixels.len() as f64).sqrt().ceil() as usize;
    save_grid(
        &a.out.join("grid.png"),
        &pixels,
        w,
        h,
        c,
        cols.max(1),
        a.force,
    )?;
    println!("decoded {} images into {}", pixels.len(), a.out.display());
    Ok(())
}

/// Distance used for the table.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MetricArg {
    /// Euclidean distance between raw codebook rows (the official tables).
    L2,
    /// Euclidean distance between l2-normalised rows (what the decoder looks up).
    L2Normalized,
}

/// Options of `lantern neighbors`.
#[derive(Args)]
pub struct NeighborsArgs {
    /// VQ model whose codebook to use (folder or official .pt).
    #[arg(long)]
    vq: PathBuf,
    /// Neighbours kept per code (at most codebook size - 1).
    #[arg(long, default_value_t = 1000)]
    k: usize,
    /// Distance.
    #[arg(long, value_enum, default_value = "l2")]
    metric: MetricArg,
    /// Import the official `top_{V-1}_indices.npy` instead of computing the table.
    #[arg(long)]
    from_npy: Option<PathBuf>,
    /// Output file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

/// Builds (or imports) the latent proximity table of a codebook.
pub fn neighbors(a: NeighborsArgs) -> Result<()> {
    check_new_output(&a.out, a.force)?;
    let dev = candle_core::Device::Cpu;
    let vq = load_vq(&a.vq, &dev)?;
    let cb = vq.codebook()?;
    let (v, d) = cb.dims2()?;
    let data = cb.flatten_all()?.to_vec1::<f32>()?;
    let start = std::time::Instant::now();
    let table = match &a.from_npy {
        Some(p) => {
            let t = Neighbors::from_npy(p, Some(a.k))?;
            t.check_codebook(v, None)?;
            t
        }
        None => {
            let metric = match a.metric {
                MetricArg::L2 => Metric::L2,
                MetricArg::L2Normalized => Metric::L2Normalized,
            };
            Neighbors::build(&data, v, d, a.k, metric)?
        }
    };
    table.save(&a.out, &a.vq.display().to_string())?;
    println!(
        "neighbour table: {v} codes x {} neighbours in {:.2} s -> {}",
        table.k_max(),
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// Options of `lantern eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Folder of generated images: one sub-folder per class name (as `generate --by-class` writes).
    images: PathBuf,
    /// Evaluation classifier folder.
    #[arg(long)]
    classifier: PathBuf,
    /// Fashion-MNIST folder (reference statistics from the test split).
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    data: PathBuf,
    #[command(flatten)]
    device: DeviceOpts,
}

/// Class accuracy and classifier-FID of a folder of generated images.
pub fn eval(a: EvalArgs) -> Result<()> {
    let dev = a.device.device()?;
    let clf = Classifier::load_dir(&a.classifier, &dev)?;
    let cfg = clf.config().clone();
    // read at the images' own size: the classifier centre-crops or pads them exactly as it did
    // its training data (resizing 32 px generations to 28 px would shrink every object)
    let side = image_folder_side(&a.images)?;
    let mut gen = image_folder(&a.images, side, cfg.in_channels)?;
    // map folder class names onto the classifier's ids
    let ids: Vec<u32> = gen
        .class_names
        .iter()
        .map(|n| {
            cfg.class_names
                .iter()
                .position(|c| c == n)
                .map(|i| i as u32)
                .with_context(|| {
                    format!(
                        "folder class `{n}` is not a classifier class ({})",
                        cfg.class_names.join(", ")
                    )
                })
        })
        .collect::<Result<_>>()?;
    gen.labels = gen.labels.iter().map(|&l| ids[l as usize]).collect();
    if gen.len() < 2 {
        bail!(
            "{} holds {} images; FID needs at least 2",
            a.images.display(),
            gen.len()
        );
    }
    let test = fashion_mnist(&a.data, Split::Test)?;
    let (gf, gp) = clf.predict(&gen, &dev)?;
    let (tf, _) = clf.predict(&test, &dev)?;
    let acc = gp.iter().zip(&gen.labels).filter(|(p, l)| p == l).count() as f64 / gen.len() as f64;
    let d = cfg.feature_dim;
    let f = fid(
        &FeatureStats::from_rows(&gf, d)?,
        &FeatureStats::from_rows(&tf, d)?,
    )?;
    println!(
        "{} generated images: class accuracy {:.2}%, classifier-FID {:.3} (vs {} test images)",
        gen.len(),
        100.0 * acc,
        f,
        test.len()
    );
    Ok(())
}
