//! `lantern bench`: one table comparing decoding modes on the same classes and seeds: tau,
//! target forwards, latency (median, p90), speed-up vs plain AR measured in the same run, TVD
//! moved, class accuracy and classifier-FID; plus the model's token-ambiguity statistics.
use crate::common::{progress_bar, DeviceOpts};
use crate::generate_cmd::{
    decode_images, decoding, run_generation, DecodeOpts, DecodingArg, ModelOpts, ResidualArg,
};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, D};
use clap::Args;
use lantern::bundle::ModelBundle;
use lantern::data::{fashion_mnist, ImageDataset, Split, FASHION_MNIST_DIR};
use lantern::eval::{fid, Classifier, FeatureStats};
use lantern::models::llamagen::Condition;
use serde::Serialize;
use std::path::PathBuf;

/// Options of `lantern bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Images per class for every mode (all classes of the model).
    #[arg(short = 'n', long, default_value_t = 2)]
    num: usize,
    /// Modes to run, comma-separated, from: ar, sd-dynamic, sd-static, lantern-D (delta D),
    /// lantern++-L (lambda L). Default: the full table.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// LANTERN / LANTERN++ neighbours per draft.
    #[arg(long, default_value_t = 100)]
    k: usize,
    /// Static tree used by sd-static and the LANTERN++ rows (auto: naive_extend_57 on a GPU,
    /// chain:3 on the CPU).
    #[arg(long, default_value = "auto")]
    static_tree: String,
    /// Dynamic tree used by sd-dynamic and the LANTERN rows.
    #[arg(long, default_value = "dynamic")]
    dynamic_tree: String,
    /// Run greedy decoding (temperature 0) instead of sampling.
    #[arg(long)]
    greedy: bool,
    /// Evaluation classifier (defaults to the bundle's classifier/).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Fashion-MNIST folder (FID reference: the test split).
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Print the table as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Time single steps (decode, tree verification, drafter, KV compaction, VQ decode) of a
    /// model with random weights at real shapes against the device's measured limits, instead
    /// of running the shipped model.
    #[arg(long)]
    random_weights: bool,
    /// Shapes for --random-weights: t2i-xl-256, c2i-xl-384 or tiny.
    #[arg(long, default_value = "t2i-xl-256")]
    preset: String,
    /// tau of exact SD and of LANTERN used for the expected image latency (--random-weights).
    #[arg(long, num_args = 2, default_values_t = [1.22, 2.10])]
    tau: Vec<f64>,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    decode: DecodeOpts,
    #[command(flatten)]
    device: DeviceOpts,
}

/// One row of the table.
#[derive(Serialize, Debug)]
struct Row {
    mode: String,
    tau: f64,
    target_forwards: f64,
    latency_median_s: f64,
    latency_p90_s: f64,
    speedup_vs_ar: f64,
    tvd_mean: f64,
    tvd_max: f64,
    class_accuracy: Option<f64>,
    classifier_fid: Option<f64>,
}

fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn default_modes() -> Vec<String> {
    [
        "ar",
        "sd-dynamic",
        "sd-static",
        "lantern-0.05",
        "lantern-0.1",
        "lantern-0.2",
        "lantern-0.4",
        "lantern++-2",
        "lantern++-3",
        "lantern++-5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Mean top-1 probability and top-10 mass of the CFG-combined target distribution along
/// sequences (teacher-forced).
fn ambiguity(
    bundle: &ModelBundle,
    classes: &[u32],
    tokens: &[Vec<u32>],
    cfg_scale: f32,
) -> Result<(f64, f64)> {
    let gpt = &bundle.gpt;
    let dev = gpt.device();
    let n = tokens.len().min(16);
    let (mut top1, mut top10, mut count) = (0f64, 0f64, 0usize);
    for i in 0..n {
        let seq = &tokens[i];
        let toks = Tensor::new(&seq[..seq.len() - 1], dev)?
            .unsqueeze(0)?
            .repeat((2, 1))?;
        let null = gpt.config().num_classes as u32;
        let cond = gpt.embed_condition(&Condition::Classes(vec![classes[i], null]))?;
        let (_, logits) = gpt.forward_train(&cond, &toks, None)?;
        let c = logits.get(0)?;
        let u = logits.get(1)?;
        let mixed = (&u + ((&c - &u)? * cfg_scale as f64)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&mixed.to_dtype(DType::F32)?)?;
        let sorted = probs.sort_last_dim(false)?.0;
        top1 += sorted
            .narrow(D::Minus1, 0, 1)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        top10 += sorted
            .narrow(D::Minus1, 0, 10)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        count += sorted.dim(0)?;
    }
    Ok((top1 / count.max(1) as f64, top10 / count.max(1) as f64))
}

/// Runs `lantern bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let dev = a.device.device()?;
    if a.random_weights {
        return steps(&a, &dev);
    }
    let bundle = a.model.load(&dev)?;
    let classes: Vec<u32> = (0..bundle.gpt.config().num_classes as u32).collect();
    let mut decode = a.decode.clone();
    if a.greedy {
        decode.temperature = 0.0;
    }
    let sampling = decode.sampling()?;
    let clf_path = a
        .classifier
        .clone()
        .unwrap_or_else(|| a.model.models.join("classifier"));
    let clf = if clf_path.exists() {
        Some(Classifier::load_dir(&clf_path, &dev)?)
    } else {
        None
    };
    // FID reference: the whole test split; the FID of its two halves against each other is the
    // floor a perfect generator would reach with 5000 images.
    let mut halves_fid = None;
    let reference = match &clf {
        Some(c) => {
            let test = fashion_mnist(&a.data, Split::Test).with_context(|| {
                "the FID reference needs Fashion-MNIST (apt-get install dataset-fashion-mnist)"
            })?;
            let (f, _) = c.predict(&test, &dev)?;
            let d = c.config().feature_dim;
            let half = test.len() / 2 * d;
            halves_fid = Some(fid(
                &FeatureStats::from_rows(&f[..half], d)?,
                &FeatureStats::from_rows(&f[half..], d)?,
            )?);
            Some(FeatureStats::from_rows(&f, d)?)
        }
        None => None,
    };
    let modes = if a.modes.is_empty() {
        default_modes()
    } else {
        a.modes.clone()
    };
    let total = (modes.len() * classes.len() * a.num) as u64;
    let pb = progress_bar(total, "bench");
    let mut rows: Vec<Row> = Vec::new();
    let mut ar_latency = None;
    let mut ambiguity_stats = None;
    for mode in &modes {
        let (kind, tree, delta, lambda) = match mode.as_str() {
            "ar" => (DecodingArg::Ar, a.dynamic_tree.as_str(), 0.0, 1.0),
            "sd-dynamic" => (DecodingArg::Sd, a.dynamic_tree.as_str(), 0.0, 1.0),
            "sd-static" => (DecodingArg::Sd, a.static_tree.as_str(), 0.0, 1.0),
            m if m.starts_with("lantern++-") => {
                let l: f32 = m["lantern++-".len()..].parse().with_context(|| format!("bad mode `{m}`: use lantern++-LAMBDA"))?;
                (DecodingArg::LanternPp, a.static_tree.as_str(), 0.0, l)
            }
            m if m.starts_with("lantern-") => {
                let d: f32 = m["lantern-".len()..].parse().with_context(|| format!("bad mode `{m}`: use lantern-DELTA"))?;
                (DecodingArg::Lantern, a.dynamic_tree.as_str(), d, 1.0)
            }
            m => anyhow::bail!("unknown bench mode `{m}`: use ar, sd-dynamic, sd-static, lantern-DELTA or lantern++-LAMBDA"),
        };
        let dec = decoding(
            kind,
            tree,
            a.k,
            delta,
            lambda,
            ResidualArg::Standard,
            sampling.is_greedy(),
            &bundle,
        )?;
        // one image at a time: per-image latency
        let mut latencies = Vec::new();
        let mut tokens = Vec::new();
        let mut labels = Vec::new();
        let mut stats = Vec::new();
        for &c in &classes {
            for j in 0..a.num {
                let mut d = decode.clone();
                d.seed = decode.seed + (c as u64) * 1000 + j as u64;
                let t0 = std::time::Instant::now();
                let g = run_generation(&bundle, &[c], 1, &dec, &d, 1, None)?;
                latencies.push(t0.elapsed().as_secs_f64());
                tokens.extend(g.tokens);
                labels.extend(g.classes);
                stats.extend(g.stats);
                pb.inc(1);
            }
        }
        let n = stats.len().max(1) as f64;
        let median = quantile(&latencies, 0.5);
        if kind == DecodingArg::Ar {
            ar_latency = Some(median);
            ambiguity_stats = Some(ambiguity(&bundle, &labels, &tokens, decode.cfg)?);
        }
        let (acc, f) = match (&clf, &reference) {
            (Some(c), Some(r)) => {
                let (pixels, w, h, ch) = decode_images(&bundle, &tokens)?;
                let data = ImageDataset {
                    images: pixels.concat(),
                    labels: labels.clone(),
                    height: h,
                    width: w,
                    channels: ch,
                    class_names: bundle.class_names.clone(),
                };
                let (feats, pred) = c.predict(&data, &dev)?;
                let acc = pred.iter().zip(&labels).filter(|(p, l)| p == l).count() as f64
                    / labels.len() as f64;
                let fd = fid(&FeatureStats::from_rows(&feats, c.config().feature_dim)?, r)?;
                (Some(acc), Some(fd))
            }
            _ => (None, None),
        };
        rows.push(Row {
            mode: mode.clone(),
            tau: stats.iter().map(|s| s.tau).sum::<f64>() / n,
            target_forwards: stats.iter().map(|s| s.target_forwards as f64).sum::<f64>() / n,
            latency_median_s: median,
            latency_p90_s: quantile(&latencies, 0.9),
            speedup_vs_ar: ar_latency.map_or(f64::NAN, |ar| ar / median),
            tvd_mean: stats.iter().map(|s| s.tvd_mean).sum::<f64>() / n,
            tvd_max: stats.iter().map(|s| s.tvd_max).fold(0.0, f64::max),
            class_accuracy: acc,
            classifier_fid: f,
        });
    }
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "rows": rows,
                "ambiguity": ambiguity_stats.map(|(t1, t10)| serde_json::json!({"mean_top1": t1, "mean_top10": t10})),
                "images_per_mode": classes.len() * a.num,
                "fid_test_halves": halves_fid,
                "sampling": format!("{sampling:?}"),
                "cfg": decode.cfg,
                "k": a.k,
            }))?
        );
        return Ok(());
    }
    println!(
        "lantern bench: {} images per mode ({} classes x {}), cfg {}, {:?}, k {}, device {:?}",
        classes.len() * a.num,
        classes.len(),
        a.num,
        decode.cfg,
        sampling,
        a.k,
        dev
    );
    if let Some(h) = halves_fid {
        println!("classifier-FID of the test set's two halves (5000 vs 5000 images): {h:.3}; FID grows as the sample shrinks, so compare rows only with each other");
    }
    if let Some((t1, t10)) = ambiguity_stats {
        println!("token ambiguity (AR samples, teacher-forced): mean top-1 probability {t1:.3}, mean top-10 mass {t10:.3}");
    }
    println!(
        "| {:<13} | {:>5} | {:>8} | {:>9} | {:>9} | {:>7} | {:>8} | {:>7} | {:>7} | {:>7} |",
        "mode",
        "tau",
        "fwd/img",
        "median s",
        "p90 s",
        "speedup",
        "TVD mean",
        "TVD max",
        "acc %",
        "FID"
    );
    println!(
        "|{}|",
        [
            "---------------",
            "-------",
            "----------",
            "-----------",
            "-----------",
            "---------",
            "----------",
            "---------",
            "---------",
            "---------"
        ]
        .join("|")
    );
    for r in &rows {
        let opt = |v: Option<f64>, s: f64| v.map_or("-".to_string(), |x| format!("{:.2}", x * s));
        println!(
            "| {:<13} | {:>5.2} | {:>8.1} | {:>9.3} | {:>9.3} | {:>6.2}x | {:>8.4} | {:>7.4} | {:>7} | {:>7} |",
            r.mode,
            r.tau,
            r.target_forwards,
            r.latency_median_s,
            r.latency_p90_s,
            r.speedup_vs_ar,
            r.tvd_mean,
            r.tvd_max,
            opt(r.class_accuracy, 100.0),
            opt(r.classifier_fid, 1.0)
        );
    }
    Ok(())
}

fn steps(a: &BenchArgs, dev: &candle_core::Device) -> Result<()> {
    use lantern::bench::steps::{expected_latency, run_step_bench, StepBenchConfig, StepPreset};
    let preset: StepPreset = a.preset.parse()?;
    let cfg = StepBenchConfig::new(preset, dev);
    let start = std::time::Instant::now();
    let report = run_step_bench(&cfg, dev)?;
    println!("{report}");
    let tokens = cfg.preset.target().block_size;
    println!(
        "expected image latency ({tokens} tokens; tau SD {}, tau LANTERN {}):",
        a.tau[0], a.tau[1]
    );
    for (name, secs) in expected_latency(&report, a.tau[0], a.tau[1], tokens) {
        println!("  {name:<24} {secs:.1} ms");
    }
    println!("(bench wall time {:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}
