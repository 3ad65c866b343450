//! `lantern bench`: one table comparing decoding modes on the same classes and seeds: tau,
//! target forwards, latency (median, p90), speed-up vs plain AR measured in the same run, TVD
//! moved, class accuracy and classifier-FID, plus where the time goes (draft / verify / accept)
//! and the model's token-ambiguity statistics. Rows are `MODE[@kK][/greedy]` ([`BenchMode`]).
use crate::bench_mode::{default_modes, BenchMode, TreeChoice};
use crate::common::{progress_bar, DeviceOpts};
use crate::generate_cmd::{
    decode_images, decoding, resolve_tree, run_generation, DecodeOpts, Generated, ModelOpts,
    ResidualArg,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use clap::Args;
use lantern::bundle::ModelBundle;
use lantern::data::{fashion_mnist, ImageDataset, Split, FASHION_MNIST_DIR};
use lantern::decode::{DecodeStats, Decoding};
use lantern::eval::{fid, Classifier, FeatureStats};
use lantern::models::llamagen::Condition;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lantern bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Images per class for every mode (all classes of the model).
    #[arg(short = 'n', long, default_value_t = 2)]
    num: usize,
    /// Rows to run, comma-separated: MODE[@kK][/greedy] with MODE one of ar, sd-dynamic,
    /// sd-static, lantern-DELTA, lantern++-LAMBDA; @kK sets the neighbours per draft of that row
    /// (at most the proximity table's k), /greedy decodes that row at temperature 0 (its
    /// speed-up is then against `ar/greedy` when that row is run). Default: the full table of
    /// issue 6 (17 rows, sampled and greedy).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// LANTERN / LANTERN++ neighbours per draft for rows without @kK.
    #[arg(long, default_value_t = 100)]
    k: usize,
    /// Images decoded together for the quality columns (tau, forwards, TVD, accuracy, FID) and
    /// the throughput column; latency is always measured one image at a time.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Images per mode timed one at a time for the latency and time-split columns, taken
    /// round-robin over the classes. Default: all images with --batch 1, else 20.
    #[arg(long)]
    timed: Option<usize>,
    /// Static tree used by sd-static and the LANTERN++ rows (auto: naive_extend_57 on a GPU,
    /// chain:3 on the CPU).
    #[arg(long, default_value = "auto")]
    static_tree: String,
    /// Dynamic tree used by sd-dynamic and the LANTERN rows.
    #[arg(long, default_value = "dynamic")]
    dynamic_tree: String,
    /// Make every row greedy (temperature 0), as if each mode ended in /greedy.
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
    /// Tokens of the verified tree for --random-weights (root included; EAGLE-2 for LlamaGen:
    /// 59, the default; tiny: 8), to see how verification cost grows with the tree.
    #[arg(long)]
    tree_tokens: Option<usize>,
    /// tau of exact SD and of LANTERN used for the expected image latency (--random-weights).
    #[arg(long, num_args = 2, default_values_t = [1.22, 2.10])]
    tau: Vec<f64>,
    /// With --random-weights: images generated end to end per speculative mode (SD static,
    /// LANTERN++, SD dynamic) to split each step into drafting, verification and acceptance
    /// (0 = skip; default 3 on a GPU, 0 on the CPU, where XL images take hours).
    #[arg(long)]
    loop_images: Option<usize>,
    /// With --random-weights on a GPU: also time read-only probe kernels (ordinary loads and
    /// bulk asynchronous copies) over buffers the size of each weight matrix, to see what a
    /// weight-streaming kernel of that size could reach.
    #[arg(long)]
    read_probes: bool,
    /// Tokens per image for --loop-images.
    #[arg(long, default_value_t = 64)]
    loop_tokens: usize,
    /// Modes of the loop split, comma-separated (ar, sd-static, lantern++-static, sd-dynamic,
    /// lantern-dynamic; default: all).
    #[arg(long, value_delimiter = ',')]
    loop_modes: Vec<String>,
    /// With --random-weights: run only the loop split (no step or kernel timings, no targets
    /// table), e.g. to profile the loop's kernels.
    #[arg(long)]
    loop_only: bool,
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
    greedy: bool,
    /// Neighbours per draft (LANTERN / LANTERN++ rows only).
    k: Option<usize>,
    /// Tree verified (speculative rows only).
    tree: Option<String>,
    tau: f64,
    target_forwards: f64,
    /// Images timed one at a time (latency and time-split columns).
    timed_images: usize,
    latency_median_s: f64,
    latency_p90_s: f64,
    /// Median AR latency / median latency of this row (AR row named by `speedup_ref`).
    speedup_vs_ar: f64,
    /// Images per second over the generation of all images in batches of `batch`.
    throughput_img_s: f64,
    /// This row's throughput / the AR row's.
    throughput_speedup_vs_ar: f64,
    /// The AR row the speed-ups divide by (`ar/greedy` for greedy rows when present).
    speedup_ref: Option<String>,
    /// Mean seconds per timed image spent drafting, in target forwards and in acceptance.
    time_draft_s: f64,
    time_verify_s: f64,
    time_accept_s: f64,
    /// Mean latency minus the three parts (sampling, host-side bookkeeping).
    time_other_s: f64,
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

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Image indices (class-major: image `c * n + j` is the `j`-th image of class `c`) in the
/// order they are timed: round-robin over the classes, so that a few timed images already
/// cover every class.
fn timed_order(num_classes: usize, n: usize) -> Vec<usize> {
    (0..n)
        .flat_map(|j| (0..num_classes).map(move |c| c * n + j))
        .collect()
}

/// Index of the AR row a row's speed-ups divide by: for greedy rows the first `ar/greedy` row
/// when there is one, else (and for sampled rows) the first sampled `ar` row.
fn speedup_reference(modes: &[BenchMode], i: usize) -> Option<usize> {
    let find = |greedy: bool| modes.iter().position(|m| m.is_ar() && m.greedy == greedy);
    if modes[i].greedy {
        find(true).or_else(|| find(false))
    } else {
        find(false)
    }
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

/// What one mode produced: all images (quality columns) and the images timed one at a time.
struct ModeRun {
    tokens: Vec<Vec<u32>>,
    labels: Vec<u32>,
    stats: Vec<DecodeStats>,
    /// Wall seconds of generating all images (batched when `--batch` > 1).
    all_secs: f64,
    latencies: Vec<f64>,
    timed_stats: Vec<DecodeStats>,
}

/// Generates the `num` images of every class for one mode. Image `i = c * num + j` (the
/// `j`-th image of class `c`) uses seed `seed + i` in every mode, batched or not:
/// `run_generation` seeds image `g` of batch `b` with `seed + b * batch + g`.
#[allow(clippy::too_many_arguments)]
fn run_mode(
    bundle: &ModelBundle,
    classes: &[u32],
    num: usize,
    dec: &Decoding,
    decode: &DecodeOpts,
    batch: usize,
    timed: &[usize],
    pb: &indicatif::ProgressBar,
) -> Result<ModeRun> {
    let single = |i: usize| -> Result<(f64, Generated)> {
        let mut d = decode.clone();
        d.seed = decode.seed + i as u64;
        let t0 = Instant::now();
        let g = run_generation(bundle, &[classes[i / num]], 1, dec, &d, 1, None)?;
        pb.inc(1);
        Ok((t0.elapsed().as_secs_f64(), g))
    };
    let mut run = ModeRun {
        tokens: Vec::new(),
        labels: Vec::new(),
        stats: Vec::new(),
        all_secs: 0.0,
        latencies: Vec::new(),
        timed_stats: Vec::new(),
    };
    if batch == 1 {
        // every image is generated alone: time them all, report the timed subset
        let mut secs = Vec::new();
        for i in 0..classes.len() * num {
            let (s, g) = single(i)?;
            secs.push(s);
            run.tokens.extend(g.tokens);
            run.labels.extend(g.classes);
            run.stats.extend(g.stats);
        }
        run.all_secs = secs.iter().sum();
        run.latencies = timed.iter().map(|&i| secs[i]).collect();
        run.timed_stats = timed.iter().map(|&i| run.stats[i].clone()).collect();
    } else {
        let t0 = Instant::now();
        let g = run_generation(bundle, classes, num, dec, decode, batch, Some(pb))?;
        run.all_secs = t0.elapsed().as_secs_f64();
        (run.tokens, run.labels, run.stats) = (g.tokens, g.classes, g.stats);
        for &i in timed {
            let (s, g) = single(i)?;
            run.latencies.push(s);
            run.timed_stats.extend(g.stats);
        }
    }
    Ok(run)
}

/// Class accuracy and classifier-FID of generated images.
fn quality(
    bundle: &ModelBundle,
    clf: &Classifier,
    reference: &FeatureStats,
    tokens: &[Vec<u32>],
    labels: &[u32],
    dev: &candle_core::Device,
) -> Result<(f64, f64)> {
    let (pixels, w, h, ch) = decode_images(bundle, tokens)?;
    let data = ImageDataset {
        images: pixels.concat(),
        labels: labels.to_vec(),
        height: h,
        width: w,
        channels: ch,
        class_names: bundle.class_names.clone(),
    };
    let (feats, pred) = clf.predict(&data, dev)?;
    let acc = pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64;
    let fd = fid(
        &FeatureStats::from_rows(&feats, clf.config().feature_dim)?,
        reference,
    )?;
    Ok((acc, fd))
}

/// Parses `--modes` (the default table when empty); `--greedy` makes every row greedy.
fn parse_modes(a: &BenchArgs) -> Result<Vec<BenchMode>> {
    let mut modes = if a.modes.is_empty() {
        default_modes()
    } else {
        a.modes
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<BenchMode>>>()?
    };
    if a.greedy {
        modes.iter_mut().for_each(|m| m.greedy = true);
    }
    Ok(modes)
}

/// Runs `lantern bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let dev = a.device.device()?;
    if a.random_weights {
        return steps(&a, &dev);
    }
    if a.loop_only || !a.loop_modes.is_empty() {
        bail!("--loop-only and --loop-modes apply to the loop split: add --random-weights");
    }
    if a.num == 0 {
        bail!("-n 0: ask for at least one image per class");
    }
    if a.batch == 0 {
        bail!("--batch 0: use 1 or more images per batch");
    }
    let modes = parse_modes(&a)?;
    let bundle = a.model.load(&dev)?;
    let classes: Vec<u32> = (0..bundle.gpt.config().num_classes as u32).collect();
    let total = classes.len() * a.num;
    let timed_n = a
        .timed
        .unwrap_or(if a.batch == 1 { total } else { total.min(20) })
        .min(total);
    let timed = &timed_order(classes.len(), a.num)[..timed_n];
    // build (and so validate) every mode before generating anything
    let k_max = bundle.neighbors.as_ref().map(|n| n.k_max());
    let mut plans = Vec::with_capacity(modes.len());
    for m in &modes {
        let k = m.effective_k(a.k);
        if let (Some(k), Some(k_max)) = (k, k_max) {
            if k > k_max {
                let how = if m.k.is_some() { "@k" } else { "--k " };
                bail!("mode `{m}`: k {k} exceeds the {k_max} neighbours stored in the proximity table; use {how}{k_max} or less, or rebuild the table with a larger k");
            }
        }
        let tree = match m.tree {
            TreeChoice::Static => a.static_tree.as_str(),
            TreeChoice::Dynamic => a.dynamic_tree.as_str(),
        };
        let dec = decoding(
            m.kind,
            tree,
            k.unwrap_or(a.k),
            m.delta,
            m.lambda,
            ResidualArg::Standard,
            m.greedy,
            &bundle,
        )
        .with_context(|| format!("mode `{m}`"))?;
        let mut decode = a.decode.clone();
        if m.greedy {
            decode.temperature = 0.0;
        }
        decode.sampling().with_context(|| format!("mode `{m}`"))?;
        let tree = (!m.is_ar()).then(|| resolve_tree(tree, &dev).to_string());
        plans.push((dec, decode, k, tree));
    }
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
    let extra = if a.batch == 1 { 0 } else { timed_n };
    let pb = progress_bar((modes.len() * (total + extra)) as u64, "bench");
    let mut rows: Vec<Row> = Vec::new();
    let mut ambiguity_stats = None;
    for (m, (dec, decode, k, tree)) in modes.iter().zip(&plans) {
        pb.set_message(m.to_string());
        let r = run_mode(&bundle, &classes, a.num, dec, decode, a.batch, timed, &pb)?;
        if m.is_ar() && !m.greedy && ambiguity_stats.is_none() {
            // up to 16 sequences, round-robin over the classes
            let pick = timed_order(classes.len(), a.num);
            let labels: Vec<u32> = pick.iter().map(|&i| r.labels[i]).collect();
            let tokens: Vec<Vec<u32>> = pick.iter().map(|&i| r.tokens[i].clone()).collect();
            ambiguity_stats = Some(ambiguity(&bundle, &labels, &tokens, decode.cfg)?);
        }
        let (acc, f) = match (&clf, &reference) {
            (Some(c), Some(rf)) => {
                let (acc, f) = quality(&bundle, c, rf, &r.tokens, &r.labels, &dev)?;
                (Some(acc), Some(f))
            }
            _ => (None, None),
        };
        let ts = &r.timed_stats;
        let (draft, verify, accept) = (
            mean(ts.iter().map(|s| s.time_draft)),
            mean(ts.iter().map(|s| s.time_verify)),
            mean(ts.iter().map(|s| s.time_accept)),
        );
        rows.push(Row {
            mode: m.to_string(),
            greedy: m.greedy,
            k: *k,
            tree: tree.clone(),
            tau: mean(r.stats.iter().map(|s| s.tau)),
            target_forwards: mean(r.stats.iter().map(|s| s.target_forwards as f64)),
            timed_images: r.latencies.len(),
            latency_median_s: quantile(&r.latencies, 0.5),
            latency_p90_s: quantile(&r.latencies, 0.9),
            speedup_vs_ar: f64::NAN,
            throughput_img_s: r.tokens.len() as f64 / r.all_secs,
            throughput_speedup_vs_ar: f64::NAN,
            speedup_ref: None,
            time_draft_s: draft,
            time_verify_s: verify,
            time_accept_s: accept,
            time_other_s: mean(r.latencies.iter().copied()) - draft - verify - accept,
            tvd_mean: mean(r.stats.iter().map(|s| s.tvd_mean)),
            tvd_max: r.stats.iter().map(|s| s.tvd_max).fold(0.0, f64::max),
            class_accuracy: acc,
            classifier_fid: f,
        });
    }
    pb.finish_and_clear();
    for i in 0..rows.len() {
        if let Some(j) = speedup_reference(&modes, i) {
            rows[i].speedup_vs_ar = rows[j].latency_median_s / rows[i].latency_median_s;
            rows[i].throughput_speedup_vs_ar = rows[i].throughput_img_s / rows[j].throughput_img_s;
            rows[i].speedup_ref = Some(rows[j].mode.clone());
        }
    }
    let sampling = a.decode.sampling()?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "rows": rows,
                "ambiguity": ambiguity_stats.map(|(t1, t10)| serde_json::json!({"mean_top1": t1, "mean_top10": t10})),
                "images_per_mode": total,
                "batch": a.batch,
                "timed_images": timed_n,
                "seeds": format!("image i = class * {} + j uses seed {} + i in every mode", a.num, a.decode.seed),
                "fid_test_halves": halves_fid,
                "sampling": format!("{sampling:?}"),
                "cfg": a.decode.cfg,
                "k": a.k,
                "device": format!("{dev:?}"),
            }))?
        );
        return Ok(());
    }
    print_tables(&a, &rows, total, timed_n, &sampling, &dev);
    if let Some(h) = halves_fid {
        println!("classifier-FID of the test set's two halves (5000 vs 5000 images): {h:.3}; FID grows as the sample shrinks, so compare rows only with each other");
    }
    if let Some((t1, t10)) = ambiguity_stats {
        println!("token ambiguity (AR samples, teacher-forced): mean top-1 probability {t1:.3}, mean top-10 mass {t10:.3}");
    }
    Ok(())
}

/// Prints the main table and the time-split table as Markdown.
fn print_tables(
    a: &BenchArgs,
    rows: &[Row],
    total: usize,
    timed_n: usize,
    sampling: &lantern::sampling::SamplingParams,
    dev: &candle_core::Device,
) {
    let n_cls = total / a.num.max(1);
    println!(
        "lantern bench: {total} images per mode ({n_cls} classes x {}, image i = class * {} + j uses seed {} + i in every mode), batch {}, cfg {}, {:?} (rows marked /greedy: temperature 0), k {} unless @kK, device {:?}",
        a.num, a.num, a.decode.seed, a.batch, a.decode.cfg, sampling, a.k, dev
    );
    let batched = a.batch > 1;
    println!(
        "tau, forwards, TVD, accuracy and FID over all {total} images{}; latency over the first {timed_n} (round-robin over classes) generated one at a time; speed-up = median latency of the AR row in `vs` / this row's{}",
        if batched { format!(" generated {} at a time", a.batch) } else { String::new() },
        if batched { "; img/s over the batched generation, x = throughput / the `vs` row's" } else { "" }
    );
    let opt = |v: Option<f64>, s: f64| v.map_or("-".to_string(), |x| format!("{:.2}", x * s));
    let num = |x: f64, p: usize| {
        if x.is_finite() {
            format!("{x:.p$}")
        } else {
            "-".into()
        }
    };
    let times = |x: f64| num(x, 2) + if x.is_finite() { "x" } else { "" };
    let w = rows.iter().map(|r| r.mode.len()).max().unwrap_or(4).max(4);
    let mut head = format!(
        "| {:<w$} | {:>5} | {:>7} | {:>8} | {:>8} | {:>7} | {:<10} |",
        "mode", "tau", "fwd/img", "median s", "p90 s", "speedup", "vs"
    );
    if batched {
        head += &format!(" {:>7} | {:>7} |", "img/s", "x");
    }
    head += &format!(
        " {:>8} | {:>7} | {:>6} | {:>7} |",
        "TVD mean", "TVD max", "acc %", "FID"
    );
    println!("{head}");
    let ncols = head.matches('|').count() - 1;
    println!(
        "|{}|",
        (0..ncols)
            .map(|i| if i == 0 { ":--" } else { "--:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        let mut line = format!(
            "| {:<w$} | {:>5.2} | {:>7.1} | {:>8} | {:>8} | {:>7} | {:<10} |",
            r.mode,
            r.tau,
            r.target_forwards,
            num(r.latency_median_s, 3),
            num(r.latency_p90_s, 3),
            times(r.speedup_vs_ar),
            r.speedup_ref.as_deref().unwrap_or("-"),
        );
        if batched {
            line += &format!(
                " {:>7} | {:>7} |",
                num(r.throughput_img_s, 2),
                times(r.throughput_speedup_vs_ar)
            );
        }
        line += &format!(
            " {:>8.4} | {:>7.4} | {:>6} | {:>7} |",
            r.tvd_mean,
            r.tvd_max,
            opt(r.class_accuracy, 100.0),
            opt(r.classifier_fid, 1.0)
        );
        println!("{line}");
    }
    println!();
    println!("time split: mean seconds per image over the {timed_n} timed images (batch 1); other = latency - draft - verify - accept (sampling, host bookkeeping)");
    println!(
        "| {:<w$} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "mode", "total s", "draft s", "verify s", "accept s", "other s", "accept %"
    );
    println!("|:--|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let total = r.time_draft_s + r.time_verify_s + r.time_accept_s + r.time_other_s;
        println!(
            "| {:<w$} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
            r.mode,
            num(total, 3),
            num(r.time_draft_s, 3),
            num(r.time_verify_s, 3),
            num(r.time_accept_s, 4),
            num(r.time_other_s, 3),
            num(100.0 * r.time_accept_s / total, 1),
        );
    }
}

fn steps(a: &BenchArgs, dev: &candle_core::Device) -> Result<()> {
    use lantern::bench::steps::{expected_latency, run_step_bench, StepBenchConfig, StepPreset};
    let preset: StepPreset = a.preset.parse()?;
    let mut cfg = StepBenchConfig::new(preset, dev);
    if let Some(n) = a.tree_tokens {
        if n == 0 || n > 512 {
            anyhow::bail!("--tree-tokens {n} is out of range; give 1 to 512 tree tokens");
        }
        cfg.tree_tokens = n;
    }
    let start = std::time::Instant::now();
    if a.loop_only {
        let images = a.loop_images.unwrap_or(3).max(1);
        let r = lantern::bench::run_loop_bench(
            cfg.preset,
            cfg.dtype,
            dev,
            a.loop_tokens,
            images,
            &a.loop_modes,
        )?;
        println!("{r}");
        println!("(bench wall time {:.1} s)", start.elapsed().as_secs_f64());
        return Ok(());
    }
    let report = run_step_bench(&cfg, dev)?;
    println!("{report}");
    if dev.is_cuda() {
        let kernels = lantern::bench::kernels::run_kernel_bench(&cfg, report.copy_gbps, dev)?;
        println!("{kernels}");
        if a.read_probes {
            let probes = lantern::bench::kernels::run_read_probes(&cfg, report.copy_gbps, dev)?;
            println!("{probes}");
        }
    } else if a.read_probes {
        anyhow::bail!("--read-probes needs a CUDA device (--device cuda)");
    }
    let loop_images = a.loop_images.unwrap_or(if dev.is_cuda() { 3 } else { 0 });
    let loops = if loop_images > 0 {
        let r = lantern::bench::run_loop_bench(
            cfg.preset,
            cfg.dtype,
            dev,
            a.loop_tokens,
            loop_images,
            &a.loop_modes,
        )?;
        println!("{r}");
        Some(r)
    } else {
        None
    };
    let checks = lantern::bench::targets::check_targets(&report, loops.as_ref());
    println!("{}", lantern::bench::targets::TargetTable(checks));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn modes(list: &[&str]) -> Vec<BenchMode> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn greedy_rows_compare_with_greedy_ar_when_present() {
        let m = modes(&[
            "sd-static/greedy",
            "ar",
            "lantern-0.2",
            "ar/greedy",
            "ar/greedy",
        ]);
        let refs: Vec<_> = (0..m.len()).map(|i| speedup_reference(&m, i)).collect();
        assert_eq!(refs, [Some(3), Some(1), Some(1), Some(3), Some(3)]);
        // without an ar/greedy row greedy rows fall back to the sampled ar row
        let m = modes(&["ar", "sd-static/greedy"]);
        assert_eq!(speedup_reference(&m, 1), Some(0));
        // no AR row at all: no speed-up
        let m = modes(&["sd-static", "lantern++-2/greedy"]);
        assert_eq!(speedup_reference(&m, 0), None);
        assert_eq!(speedup_reference(&m, 1), None);
    }

    #[test]
    fn timed_images_go_round_robin_over_classes() {
        // 3 classes x 2 images: class-major indices 0,1 | 2,3 | 4,5
        assert_eq!(timed_order(3, 2), [0, 2, 4, 1, 3, 5]);
        assert_eq!(timed_order(2, 1), [0, 1]);
    }
}
