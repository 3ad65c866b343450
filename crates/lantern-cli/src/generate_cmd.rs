//! `lantern generate`: class-conditional (or text-conditional) image generation with plain AR,
//! exact speculative decoding, LANTERN or LANTERN++.
use crate::common::{progress_bar, DeviceOpts};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use lantern::accept::{AcceptConfig, Relaxation, Residual};
use lantern::bundle::{BundlePaths, ModelBundle};
use lantern::decode::{Decoding, GenerateOptions, TreeSpec};
use lantern::image::{save_grid, save_png, to_u8, TokenFile};
use lantern::models::llamagen::Condition;
use lantern::sampling::SamplingParams;
use std::path::{Path, PathBuf};

/// Decoding mode.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DecodingArg {
    /// Plain autoregressive decoding: one target forward per token.
    Ar,
    /// Lossless speculative decoding (exact acceptance).
    Sd,
    /// LANTERN: relaxed acceptance with an additive TVD budget (--delta, --k).
    Lantern,
    /// LANTERN++: relaxed acceptance capped at lambda x p(draft) (--lambda, --k).
    #[value(name = "lantern++")]
    LanternPp,
}

/// Residual distribution after a rejection.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ResidualArg {
    /// norm(max(0, p - q)): TV-optimal, keeps the delta bound (default).
    Standard,
    /// As the public LANTERN release: zero the draft and its k+1 nearest codes.
    Official,
}

/// Model selection shared by `generate` and `bench`.
#[derive(Args, Clone, Debug)]
pub struct ModelOpts {
    /// Model bundle folder (gpt/, vq/, drafter/, neighbors.safetensors, classes.json).
    #[arg(long, env = "LANTERN_MODELS", default_value = crate::common::DEFAULT_MODELS)]
    pub models: PathBuf,
    /// Target GPT checkpoint instead of the bundle's (folder, .safetensors or official .pt).
    #[arg(long)]
    pub gpt: Option<PathBuf>,
    /// VQ tokenizer instead of the bundle's (folder or official vq_ds16_*.pt).
    #[arg(long)]
    pub vq: Option<PathBuf>,
    /// Drafter instead of the bundle's (folder with config.json).
    #[arg(long)]
    pub drafter: Option<PathBuf>,
    /// Latent proximity table instead of the bundle's (`lantern neighbors` output or .npy).
    #[arg(long)]
    pub neighbors: Option<PathBuf>,
    /// Weights dtype of the transformer.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

/// Transformer dtype.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16 (LlamaGen's inference precision on GPUs).
    Bf16,
}

impl ModelOpts {
    /// Loads the bundle.
    pub fn load(&self, dev: &candle_core::Device) -> Result<ModelBundle> {
        let paths = BundlePaths {
            dir: Some(self.models.clone()),
            gpt: self.gpt.clone(),
            vq: self.vq.clone(),
            drafter: self.drafter.clone(),
            neighbors: self.neighbors.clone(),
        };
        let dtype = match self.dtype {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::F16 => candle_core::DType::F16,
            DTypeArg::Bf16 => candle_core::DType::BF16,
        };
        Ok(ModelBundle::load(&paths, dtype, dev)?)
    }
}

/// Decoding settings shared by `generate` and `bench`.
#[derive(Args, Clone, Debug)]
pub struct DecodeOpts {
    /// Classifier-free guidance scale (1 = off).
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep the k most likely codes (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed (image i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DecodeOpts {
    /// Sampling parameters, validated.
    pub fn sampling(&self) -> Result<SamplingParams> {
        let s = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        };
        s.validate()?;
        if !(self.cfg.is_finite() && self.cfg >= 1.0) {
            bail!(
                "invalid --cfg {}: use a finite scale >= 1 (1 = no guidance)",
                self.cfg
            );
        }
        Ok(s)
    }
}

/// Options of `lantern generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// Classes to generate, by name or id (repeat or comma-separate).
    #[arg(long = "class", value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Text prompts for text-to-image models (repeatable); needs --t5.
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// flan-T5 folder (Hugging Face layout with tokenizer.json) for --prompt.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// Cut prompts longer than 120 T5 tokens instead of failing.
    #[arg(long)]
    pub truncate_prompts: bool,
    /// Images per class (or per prompt).
    #[arg(short = 'n', long, default_value_t = 4)]
    pub num: usize,
    /// Output folder (one PNG per image and grid.png).
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Overwrite existing files in the output folder.
    #[arg(long)]
    pub force: bool,
    /// Write each image into a sub-folder named after its class (`OUT/sneaker/0007.png`), the
    /// layout `lantern eval` reads (class generation only).
    #[arg(long)]
    pub by_class: bool,
    /// Write the token grids as JSON (`{"grid":[h,w],"images":[[...],...]}`).
    #[arg(long)]
    pub save_tokens: Option<PathBuf>,
    /// Write per-image decoding statistics (tau, forwards, timings, TVD) as JSON.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Decoding mode. Default: LANTERN++ (lambda 2) on the `--tree auto` tree: the best speed
    /// at no measured quality cost in docs/BENCHMARKS.md.
    #[arg(long, value_enum, default_value = "lantern++")]
    pub decoding: DecodingArg,
    /// Draft tree: auto (naive_extend_57 on a GPU, chain:3 on the CPU, where verifying a wide
    /// tree is not free), dynamic[:TOTAL:DEPTH:TOPK], naive_extend_57, mc_sim_7b_63, chain:N, or
    /// a JSON file / literal list of rank paths.
    #[arg(long, default_value = "auto")]
    pub tree: String,
    /// LANTERN / LANTERN++: neighbours considered per draft.
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// LANTERN: total-variation budget per token.
    #[arg(long, default_value_t = 0.2)]
    pub delta: f32,
    /// LANTERN++: multiplicative cap on the boosted draft probability (2: no measurable quality
    /// loss on the shipped model; 3: faster, about 8 points of class accuracy lost).
    #[arg(long, default_value_t = 2.0)]
    pub lambda: f32,
    /// Residual after a rejection.
    #[arg(long, value_enum, default_value = "standard")]
    pub residual: ResidualArg,
    /// Images decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub decode: DecodeOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
}

impl GenerateArgs {
    /// The decoding mode these arguments ask for.
    fn decoding_mode(&self, bundle: &ModelBundle, greedy: bool) -> Result<Decoding> {
        decoding(
            self.decoding,
            &self.tree,
            self.k,
            self.delta,
            self.lambda,
            self.residual,
            greedy,
            bundle,
        )
    }
}

/// Builds the decoding mode from CLI settings.
#[allow(clippy::too_many_arguments)]
pub fn decoding(
    mode: DecodingArg,
    tree: &str,
    k: usize,
    delta: f32,
    lambda: f32,
    residual: ResidualArg,
    greedy: bool,
    bundle: &ModelBundle,
) -> Result<Decoding> {
    let relaxation = match mode {
        DecodingArg::Ar => return Ok(Decoding::Ar),
        DecodingArg::Sd => Relaxation::Exact,
        DecodingArg::Lantern => Relaxation::Lantern { k, delta },
        DecodingArg::LanternPp => Relaxation::LanternPP { k, lambda },
    };
    relaxation.validate(bundle.gpt.config().vocab_size)?;
    if bundle.drafter.is_none() {
        bail!("speculative decoding needs a drafter: the bundle has no drafter/ folder; pass --drafter DIR or --decoding ar");
    }
    let neighbors = if relaxation.is_exact() {
        None
    } else {
        let n = bundle.neighbors.clone().context(
            "LANTERN needs a latent proximity table: build one with `lantern neighbors --vq VQ --out FILE` and pass --neighbors FILE",
        )?;
        if n.k_max() < k {
            bail!("--k {k} exceeds the {} neighbours stored in the proximity table; lower --k or rebuild the table", n.k_max());
        }
        Some(n)
    };
    let tree = TreeSpec::parse(resolve_tree(tree, bundle.gpt.device()))?;
    Ok(Decoding::Speculative {
        tree,
        accept: AcceptConfig {
            relaxation,
            residual: match residual {
                ResidualArg::Standard => Residual::Standard,
                ResidualArg::Official => Residual::Official,
            },
            greedy,
        },
        neighbors,
    })
}

/// Generated images of one run.
pub struct Generated {
    /// Token grids.
    pub tokens: Vec<Vec<u32>>,
    /// Class id per image.
    pub classes: Vec<u32>,
    /// Per-image statistics.
    pub stats: Vec<lantern::decode::DecodeStats>,
}

/// Generates `per_class` images of every class in `classes`, `batch` at a time.
#[allow(clippy::too_many_arguments)]
pub fn run_generation(
    bundle: &ModelBundle,
    classes: &[u32],
    per_class: usize,
    decoding: &Decoding,
    decode: &DecodeOpts,
    batch: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Generated> {
    let sampling = decode.sampling()?;
    let labels: Vec<u32> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, per_class))
        .collect();
    let mut out = Generated {
        tokens: Vec::new(),
        classes: Vec::new(),
        stats: Vec::new(),
    };
    for (bi, chunk) in labels.chunks(batch.max(1)).enumerate() {
        let opts = GenerateOptions::new()
            .with_cfg_scale(decode.cfg)
            .with_sampling(sampling)
            .with_seed(decode.seed + (bi * batch.max(1)) as u64)
            .with_decoding(decoding.clone());
        let r = lantern::decode::llamagen::generate(
            &bundle.gpt,
            bundle.drafter.as_ref(),
            &Condition::Classes(chunk.to_vec()),
            &opts,
        )?;
        out.tokens.extend(r.tokens);
        out.stats.extend(r.stats);
        out.classes.extend_from_slice(chunk);
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok(out)
}

/// Decodes token grids to u8 images `(pixels, w, h, c)`.
pub fn decode_images(
    bundle: &ModelBundle,
    tokens: &[Vec<u32>],
) -> Result<(Vec<Vec<u8>>, usize, usize, usize)> {
    let side = (bundle.gpt.config().block_size as f64).sqrt() as usize;
    let dev = bundle.vq.device().clone();
    let mut all = Vec::new();
    let (mut w, mut h, mut c) = (0, 0, 0);
    for chunk in tokens.chunks(64) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let codes = candle_core::Tensor::from_vec(flat, (chunk.len(), side * side), &dev)?;
        let imgs = bundle.vq.decode_codes(&codes, (side, side))?;
        let dims = imgs.dims4()?;
        (c, h, w) = (dims.1, dims.2, dims.3);
        all.extend(to_u8(&imgs)?);
    }
    Ok((all, w, h, c))
}

fn check_outputs(
    a: &GenerateArgs,
    bundle: &ModelBundle,
    labels: Option<&[u32]>,
    n: usize,
) -> Result<()> {
    if a.force {
        return Ok(());
    }
    let mut paths: Vec<PathBuf> = (0..n)
        .map(|i| image_path(a, bundle, labels, i))
        .collect::<Result<_>>()?;
    paths.push(a.out.join("grid.png"));
    paths.extend(a.save_tokens.clone());
    paths.extend(a.stats_json.clone());
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        bail!(
            "{} already exists: choose another --out or pass --force to overwrite",
            p.display()
        );
    }
    Ok(())
}

fn write_json(path: &Path, value: &impl serde::Serialize, force: bool) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    lantern::image::write_atomic(path, text.as_bytes(), force)?;
    Ok(())
}

/// Runs `lantern generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let dev = a.device.device()?;
    if a.num == 0 {
        bail!("-n 0: ask for at least one image per class");
    }
    let bundle = a.model.load(&dev)?;
    if !a.prompts.is_empty() {
        return run_prompts(&a, &bundle, &dev);
    }
    if bundle.gpt.config().model_type == lantern::models::llamagen::ModelType::T2i {
        bail!("this is a text-to-image model: pass --prompt TEXT and --t5 DIR instead of --class");
    }
    let classes: Vec<u32> = if a.classes.is_empty() {
        (0..bundle.gpt.config().num_classes as u32).collect()
    } else {
        a.classes
            .iter()
            .map(|c| bundle.class_id(c.trim()))
            .collect::<Result<_, _>>()?
    };
    let sampling = a.decode.sampling()?;
    let dec = a.decoding_mode(&bundle, sampling.is_greedy())?;
    let total = classes.len() * a.num;
    let labels: Vec<u32> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, a.num))
        .collect();
    check_outputs(&a, &bundle, Some(&labels), total)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output folder {}", a.out.display()))?;
    let pb = progress_bar(total as u64, "generate");
    let start = std::time::Instant::now();
    let gen = run_generation(
        &bundle,
        &classes,
        a.num,
        &dec,
        &a.decode,
        a.batch,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    write_outputs(&a, &bundle, &gen.tokens, &gen.stats, Some(&gen.classes))?;
    let n = gen.stats.len().max(1) as f64;
    let tau = gen.stats.iter().map(|s| s.tau).sum::<f64>() / n;
    let fwd = gen
        .stats
        .iter()
        .map(|s| s.target_forwards as f64)
        .sum::<f64>()
        / n;
    println!(
        "{} images in {:.2} s ({:.3} s/image), {:?}: tau {:.2}, {:.1} target forwards per image -> {}",
        total,
        secs,
        secs / total as f64,
        a.decoding,
        tau,
        fwd,
        a.out.join("grid.png").display()
    );
    Ok(())
}

/// Text-to-image generation: T5-encode the prompts, then decode each prompt `-n` times.
fn run_prompts(a: &GenerateArgs, bundle: &ModelBundle, dev: &candle_core::Device) -> Result<()> {
    use lantern::models::t5::TextEncoder;
    if bundle.gpt.config().model_type != lantern::models::llamagen::ModelType::T2i {
        bail!("--prompt needs a text-to-image model; this one is class-conditional: use --class");
    }
    let t5_dir = a.t5.as_ref().context(
        "--prompt needs the flan-T5 encoder: pass --t5 DIR (a Hugging Face flan-t5-xl folder)",
    )?;
    let mut t5 = TextEncoder::load(t5_dir, candle_core::DType::F32, dev)?;
    t5.truncate = a.truncate_prompts;
    if t5.d_model() != bundle.gpt.config().caption_dim {
        bail!(
            "the T5 encoder gives {}-wide features but the model expects {}: use the T5 the model was trained with",
            t5.d_model(),
            bundle.gpt.config().caption_dim
        );
    }
    let sampling = a.decode.sampling()?;
    let dec = a.decoding_mode(bundle, sampling.is_greedy())?;
    let prompts: Vec<String> = a
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), a.num))
        .collect();
    if a.by_class {
        bail!("--by-class sorts images by class; with --prompt there are no classes: drop it");
    }
    check_outputs(a, bundle, None, prompts.len())?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output folder {}", a.out.display()))?;
    let pb = progress_bar(prompts.len() as u64, "generate");
    let start = std::time::Instant::now();
    let (mut tokens, mut stats) = (Vec::new(), Vec::new());
    for (bi, chunk) in prompts.chunks(a.batch.max(1)).enumerate() {
        let enc = t5.encode(chunk)?;
        let opts = GenerateOptions::new()
            .with_cfg_scale(a.decode.cfg)
            .with_sampling(sampling)
            .with_seed(a.decode.seed + (bi * a.batch.max(1)) as u64)
            .with_decoding(dec.clone());
        let cond = Condition::Captions {
            features: enc.features.to_device(dev)?,
            mask: enc.mask.to_device(dev)?,
        };
        let r = lantern::decode::llamagen::generate(
            &bundle.gpt,
            bundle.drafter.as_ref(),
            &cond,
            &opts,
        )?;
        tokens.extend(r.tokens);
        stats.extend(r.stats);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    write_outputs(a, bundle, &tokens, &stats, None)?;
    println!(
        "{} images for {} prompts in {:.2} s -> {}",
        prompts.len(),
        a.prompts.len(),
        secs,
        a.out.join("grid.png").display()
    );
    Ok(())
}

/// Writes one PNG per image, the grid (`-n` per row), and the optional token and stats files.
fn write_outputs(
    a: &GenerateArgs,
    bundle: &ModelBundle,
    tokens: &[Vec<u32>],
    stats: &[lantern::decode::DecodeStats],
    labels: Option<&[u32]>,
) -> Result<()> {
    let (pixels, w, h, c) = decode_images(bundle, tokens)?;
    for (i, p) in pixels.iter().enumerate() {
        let path = image_path(a, bundle, labels, i)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create output folder {}", dir.display()))?;
        }
        save_png(&path, p, w, h, c, a.force)?;
    }
    save_grid(
        &a.out.join("grid.png"),
        &pixels,
        w,
        h,
        c,
        a.num.max(1),
        a.force,
    )?;
    if let Some(p) = &a.save_tokens {
        let side = (bundle.gpt.config().block_size as f64).sqrt() as usize;
        TokenFile {
            grid: [side, side],
            images: tokens.to_vec(),
        }
        .write(p, a.force)?;
    }
    if let Some(p) = &a.stats_json {
        write_json(p, &stats, a.force)?;
    }
    Ok(())
}

/// Where image `i` goes: `OUT/NNNN.png`, or `OUT/<class>/NNNN.png` with `--by-class`.
fn image_path(
    a: &GenerateArgs,
    bundle: &ModelBundle,
    labels: Option<&[u32]>,
    i: usize,
) -> Result<PathBuf> {
    let name = format!("{i:04}.png");
    if !a.by_class {
        return Ok(a.out.join(name));
    }
    let label = labels
        .and_then(|l| l.get(i))
        .ok_or_else(|| anyhow::anyhow!("--by-class needs class generation (not --prompt)"))?;
    let class = bundle
        .class_names
        .get(*label as usize)
        .cloned()
        .unwrap_or_else(|| format!("class{label}"));
    Ok(a.out.join(class).join(name))
}

/// The tree `auto` stands for on `device`: measured in docs/BENCHMARKS.md, the 58-node static
/// tree is fastest on a GPU (verification costs about one decode step there), while on the CPU
/// verification cost grows with the tree and `chain:3` is fastest.
pub fn resolve_tree<'a>(tree: &'a str, device: &candle_core::Device) -> &'a str {
    match (tree, device.is_cpu()) {
        ("auto", true) => "chain:3",
        ("auto", false) => "naive_extend_57",
        (t, _) => t,
    }
}
