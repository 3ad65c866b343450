//! Per-step timing of the decoding building blocks against the device's measured ceilings
//! (issue 7 item 3), with random weights at the real shapes (no checkpoint needed).
//!
//! Ceilings are measured in the same run (fastest of the runs): copy bandwidth (a device copy, counted as
//! read + write bytes like `docs/gpu.md`) and the matmul rate of one large square matmul in the
//! bench dtype. Every step row carries its compulsory memory traffic (weights read once, KV cache
//! read, new KV and outputs written: the same read + write convention) and its FLOPs
//! (`2 * matmul params * tokens * batch` plus attention). The bounds are `bytes / copy rate` and
//! `flops / matmul rate`; efficiency is the larger bound over the measured median.
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::cost::{drafter_cost, target_cost, vq_decoder_cost};
use super::random::random_var_builder;
use crate::decode::graph_step::{graphs_enabled, FixedForward, GraphStep};
use crate::decode::speculative::folded_feed_width;
use crate::decode::tree::{DraftKind, DraftTree};
use crate::models::drafter::{Drafter, DrafterConfig};
use crate::models::llamagen::{AttnMask, Config, LlamaGen, ModelType};
use crate::models::vq::{VqConfig, VqModel};
use crate::{Error, Result};

/// Model sizes the step bench knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPreset {
    /// LlamaGen GPT-XL text-to-image stage 1 (120 caption positions, 16x16 grid), VQ-16.
    T2iXl256,
    /// LlamaGen GPT-XL class-conditional at 384 px (24x24 grid), VQ-16.
    C2iXl384,
    /// A two-layer 64-wide model on a 4x4 grid with a small VQ (tests).
    Tiny,
}

impl FromStr for StepPreset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "t2i-xl-256" => Ok(Self::T2iXl256),
            "c2i-xl-384" => Ok(Self::C2iXl384),
            "tiny" => Ok(Self::Tiny),
            o => Err(Error::invalid(
                "bench preset",
                format!("unknown preset `{o}`; use t2i-xl-256, c2i-xl-384 or tiny"),
            )),
        }
    }
}

impl StepPreset {
    /// The name `from_str` accepts.
    pub fn name(&self) -> &'static str {
        match self {
            Self::T2iXl256 => "t2i-xl-256",
            Self::C2iXl384 => "c2i-xl-384",
            Self::Tiny => "tiny",
        }
    }

    /// Target GPT configuration.
    pub fn target(&self) -> Config {
        match self {
            Self::T2iXl256 => Config::t2i_xl_stage1(),
            Self::C2iXl384 => Config::gpt_xl().with_block_size(576),
            Self::Tiny => Config {
                dim: 64,
                n_layer: 2,
                n_head: 4,
                n_kv_head: 4,
                vocab_size: 1024,
                ffn_hidden: crate::models::llamagen::config::default_ffn_hidden(64),
                num_classes: 10,
                block_size: 16,
                ..Config::gpt_b()
            },
        }
    }

    /// Drafter of the target's width (one layer, LANTERN's RoPE layout for the input type).
    pub fn drafter(&self) -> DrafterConfig {
        let t = self.target();
        let (input_type, cls) = match t.model_type {
            ModelType::T2i => ("t2i", 119),
            ModelType::C2i => ("c2i", 0),
        };
        DrafterConfig {
            hidden_size: t.dim,
            intermediate_size: t.ffn_hidden,
            num_attention_heads: t.n_head,
            num_key_value_heads: t.n_kv_head,
            vocab_size: t.vocab_size,
            rms_norm_eps: 1e-6,
            cls_token_num: cls,
            block_size: t.block_size,
            input_type: input_type.into(),
            rope_base: t.rope_base,
            extra_rope_rows: 20,
        }
    }

    /// VQ tokenizer and the side of the token grid one image decodes from.
    pub fn vq(&self) -> (VqConfig, usize) {
        match self {
            Self::T2iXl256 => (VqConfig::vq16(), 16),
            Self::C2iXl384 => (VqConfig::vq16(), 24),
            Self::Tiny => (VqConfig::fashion_small(), 4),
        }
    }
}

/// A timed model step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// One token per sequence with a filled cache, embedding to logits.
    Decode,
    /// A draft tree of `tree_tokens` verified in one target forward (tree mask), to logits.
    Verify,
    /// One drafter level over `drafter_tokens` tokens plus the target's `lm_head`.
    Drafter,
    /// KV-cache compaction of an accepted path (3 of the tree's rows) after a verify step.
    KvCompact,
    /// VQ decoding of one image (batch 1).
    VqDecode,
}

impl Step {
    /// All steps, in table order.
    pub const ALL: [Step; 5] = [
        Step::Decode,
        Step::Verify,
        Step::Drafter,
        Step::KvCompact,
        Step::VqDecode,
    ];

    /// The prefix of the row name (rows add their sizes after it).
    pub fn name(&self) -> &'static str {
        match self {
            Step::Decode => "decode",
            Step::Verify => "verify",
            Step::Drafter => "drafter",
            Step::KvCompact => "kv compact",
            Step::VqDecode => "vq decode",
        }
    }
}

/// What to measure and how.
#[derive(Clone, Debug)]
pub struct StepBenchConfig {
    pub preset: StepPreset,
    /// Sequences per step (2 = one image with classifier-free guidance).
    pub batch: usize,
    /// Tokens of a verified draft tree, root included (EAGLE-2 for LlamaGen: 59).
    pub tree_tokens: usize,
    /// Cached positions before the timed step (condition + image tokens so far).
    pub prefix_len: usize,
    /// Weight and activation dtype (bf16 on the GPU, f32 on the CPU).
    pub dtype: DType,
    /// Untimed runs before each measurement.
    pub warmup: usize,
    /// Timed runs; rows report the median.
    pub iters: usize,
    /// Tokens of one drafter level (EAGLE-2 top-10: 10).
    pub drafter_tokens: usize,
    /// Bytes of the tensor copied for the bandwidth ceiling.
    pub copy_bytes: usize,
    /// Side of the square matmul for the compute ceiling.
    pub matmul_n: usize,
    /// Steps to time (copy and matmul ceilings always run).
    pub steps: Vec<Step>,
}

impl StepBenchConfig {
    /// Defaults for `preset` on `device`: bf16, 1 GiB copy, 8192³ matmul, 3 + 20 runs on CUDA;
    /// f32, 64 MiB copy, 512³ matmul, 1 + 3 runs on the CPU. The cache holds the condition and
    /// half of the image tokens.
    pub fn new(preset: StepPreset, device: &Device) -> Self {
        let t = preset.target();
        let gpu = device.is_cuda();
        let tiny = preset == StepPreset::Tiny;
        Self {
            preset,
            batch: 2,
            tree_tokens: if tiny { 8 } else { 59 },
            prefix_len: t.cls_token_num + t.block_size / 2,
            dtype: if gpu { DType::BF16 } else { DType::F32 },
            warmup: if gpu { 3 } else { 1 },
            iters: if gpu { 20 } else { 3 },
            drafter_tokens: if tiny { 4 } else { 10 },
            copy_bytes: if gpu { 1 << 30 } else { 64 << 20 },
            matmul_n: if gpu { 8192 } else { 512 },
            steps: Step::ALL.to_vec(),
        }
    }
}

/// One timed step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    pub name: String,
    /// Median wall time over the timed runs (device synchronised around each).
    pub measured_ms: f64,
    /// Compulsory memory traffic, read + write.
    pub bytes: f64,
    pub flops: f64,
    /// `bytes / copy bandwidth`.
    pub bound_bw_ms: f64,
    /// `flops / matmul rate`.
    pub bound_flops_ms: f64,
    /// `max(bound_bw_ms, bound_flops_ms) / measured_ms`.
    pub efficiency: f64,
}

/// Result of [`run_step_bench`].
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Device, dtype, batch and preset.
    pub device: String,
    /// Device copy bandwidth, GB/s counting read + write bytes.
    pub copy_gbps: f64,
    /// Dense matmul rate in the bench dtype, TFLOP/s.
    pub matmul_tflops: f64,
    pub rows: Vec<StepRow>,
}

impl StepReport {
    /// The fastest row whose name starts with `step`'s name (decode: the ordinary or the
    /// fixed-shape / CUDA-graph variant, whichever the decoding loops would do better with).
    pub fn row(&self, step: Step) -> Option<&StepRow> {
        self.rows
            .iter()
            .filter(|r| r.name.starts_with(step.name()))
            .min_by(|a, b| a.measured_ms.total_cmp(&b.measured_ms))
    }

    fn push(&mut self, name: String, measured_ms: f64, bytes: f64, flops: f64) {
        let bound_bw_ms = bytes / (self.copy_gbps * 1e9) * 1e3;
        let bound_flops_ms = flops / (self.matmul_tflops * 1e12) * 1e3;
        self.rows.push(StepRow {
            name,
            measured_ms,
            bytes,
            flops,
            bound_bw_ms,
            bound_flops_ms,
            efficiency: bound_bw_ms.max(bound_flops_ms) / measured_ms,
        });
    }
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "step timing on {}: copy {:.0} GB/s (read + write bytes), matmul {:.2} TFLOP/s",
            self.device, self.copy_gbps, self.matmul_tflops
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| step | measured ms | MB moved | GFLOP | bandwidth bound ms | FLOP bound ms | efficiency |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {:.3} | {:.1} | {:.2} | {:.3} | {:.3} | {:.1}% |",
                r.name,
                r.measured_ms,
                r.bytes / 1e6,
                r.flops / 1e9,
                r.bound_bw_ms,
                r.bound_flops_ms,
                r.efficiency * 100.0
            )?;
        }
        Ok(())
    }
}

/// Drafter levels per speculative cycle in the latency model (EAGLE-2 for LlamaGen: the level
/// over the newly accepted tokens plus 4 expansions).
pub const DRAFT_LEVELS: usize = 5;

/// Name prefix of the drafting-phase row (see [`expected_latency`]).
const DRAFTING_PHASE: &str = "drafting phase";

/// Image latency estimates in ms from the step times, for `tokens` image tokens:
/// - `AR = tokens * decode`
/// - `SD = tokens / tau_sd * (verify + drafting + kv_compact)`
/// - `LANTERN = tokens / tau_lantern * (same cycle)`
///
/// where drafting is the measured drafting phase of a static tree when the report has it (all
/// levels with their output heads, probabilities and picks, the tree building, and the drafter
/// fed the accepted tokens first where the loop folds that feed in), else `DRAFT_LEVELS *
/// drafter`. tau is tokens per target forward (bonus included). Acceptance (and an unfolded
/// feed) are not counted, so SD and LANTERN are lower bounds. Token generation only, like the
/// official timings; a `VQ decode` entry gives the extra time of an end-to-end image. Entries
/// whose steps were not measured are left out.
pub fn expected_latency(
    report: &StepReport,
    tau_sd: f64,
    tau_lantern: f64,
    tokens: usize,
) -> Vec<(String, f64)> {
    let ms = |s: Step| report.row(s).map(|r| r.measured_ms);
    let n = tokens as f64;
    let mut out = Vec::new();
    if let Some(d) = ms(Step::Decode) {
        out.push(("AR".to_string(), n * d));
    }
    if let (Some(v), Some(dr)) = (ms(Step::Verify), ms(Step::Drafter)) {
        let phase = report
            .rows
            .iter()
            .find(|r| r.name.starts_with(DRAFTING_PHASE))
            .map(|r| r.measured_ms);
        let drafting = phase.unwrap_or(DRAFT_LEVELS as f64 * dr);
        let cycle = v + drafting + ms(Step::KvCompact).unwrap_or(0.0);
        out.push(("SD".to_string(), n / tau_sd * cycle));
        out.push(("LANTERN".to_string(), n / tau_lantern * cycle));
    }
    if let Some(v) = ms(Step::VqDecode) {
        out.push(("VQ decode".to_string(), v));
    }
    out
}

/// Wall times in ms of `iters` runs of `f` (sorted) after `warmup` runs, synchronising the
/// device before and after each timed run.
fn times_ms(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Median of [`times_ms`]: what the step rows report.
fn time_ms(
    device: &Device,
    warmup: usize,
    iters: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let t = times_ms(device, warmup, iters, f)?;
    Ok(t[t.len() / 2])
}

/// Fastest of [`times_ms`] (at least one warm-up): the ceilings are the best the device did.
fn best_ms(
    device: &Device,
    warmup: usize,
    iters: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    Ok(times_ms(device, warmup.max(1), iters, f)?[0])
}

/// Times the fixed-shape variant of a target step ([`GraphStep`], a CUDA graph on GPUs) at
/// cache length `p`; returns the median and how it ran.
/// Times a step closure (median ms).
type Timer<'a> = dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<f64> + 'a;

#[allow(clippy::too_many_arguments)]
fn time_fixed(
    model: &dyn FixedForward,
    cache: &mut crate::cache::KvCache,
    p: usize,
    ids: &Tensor,
    features: Option<&Tensor>,
    pos: &Tensor,
    mask: &Tensor,
    time: &Timer,
) -> Result<(f64, &'static str)> {
    let mut step = GraphStep::new(
        model,
        ids.dim(0)?,
        ids.dim(1)?,
        pos.dims(),
        features.map(|f| f.dim(2)).transpose()?,
        cache.max_len(),
        graphs_enabled(model.fixed_device()),
    )?;
    let ms = time(&mut || {
        cache.truncate(p);
        step.forward(model, cache, ids, features, pos, mask)?;
        Ok(())
    })?;
    cache.truncate(p);
    let how = if step.is_captured() {
        "cuda graph"
    } else {
        "fixed shape"
    };
    Ok((ms, how))
}

/// The inputs of a drafting-phase row: images and CFG scale of the batch (batch 2 is one image
/// with CFG), random root features, an all-visible prefix, the roots' positions and tokens.
struct DraftingInputs {
    n_img: usize,
    scale: Option<f32>,
    root_feat: Tensor,
    prefix: Vec<Vec<f32>>,
    roots: Vec<usize>,
    root_tokens: Vec<u32>,
}

impl DraftingInputs {
    /// The step's inputs as the drafting computations take them.
    fn step(&self, vocab: usize) -> crate::decode::draft_graph::DraftStep<'_> {
        crate::decode::draft_graph::DraftStep {
            root_tokens: &self.root_tokens,
            root_feat: &self.root_feat,
            prefix: &self.prefix,
            roots: &self.roots,
            vocab,
            feed: None,
        }
    }
}

/// The drafter side of a drafting-phase row: its cache and computations.
struct DraftingState {
    kv: crate::cache::KvCache,
    graphs: Vec<crate::decode::draft_graph::StaticDrafting>,
    dynamic: Vec<crate::decode::dynamic_graph::DynamicDrafting>,
    rope: (usize, usize),
    capture: bool,
}

impl DraftingState {
    /// How the computation runs, for the row's name.
    fn how(&self) -> &'static str {
        if self.capture {
            "cuda graph"
        } else {
            "fixed shape"
        }
    }

    fn fx<'a>(&'a mut self, drafter: &'a Drafter) -> crate::decode::draft_graph::FixedDrafting<'a> {
        crate::decode::draft_graph::FixedDrafting {
            model: drafter,
            kv: &mut self.kv,
            graphs: &mut self.graphs,
            dynamic: &mut self.dynamic,
            capture: self.capture,
            rope_rows: self.rope.0,
            zero_row: self.rope.1,
        }
    }
}

/// A drafting-phase row's inputs and state: a drafter cache of `capacity` slots with `dp`
/// positions cached.
fn drafting_bench(
    cfg: &StepBenchConfig,
    model: &LlamaGen,
    drafter: &Drafter,
    dp: usize,
    capacity: usize,
) -> Result<(DraftingInputs, DraftingState)> {
    let b = cfg.batch;
    let device = drafter.device();
    let (n_img, scale) = if b.is_multiple_of(2) {
        (b / 2, Some(4.0))
    } else {
        (b, None)
    };
    let mut kv = drafter.new_cache(b, capacity)?;
    kv.advance(dp);
    let dim = model.config().dim;
    let inputs = DraftingInputs {
        n_img,
        scale,
        root_feat: Tensor::randn(0f32, 1.0, (b, 1, dim), device)?.to_dtype(cfg.dtype)?,
        prefix: vec![vec![0f32; dp]; n_img],
        roots: vec![dp + 1; n_img],
        root_tokens: vec![0u32; n_img],
    };
    let state = DraftingState {
        kv,
        graphs: Vec::new(),
        dynamic: Vec::new(),
        rope: drafter.rope_clamp(),
        capture: graphs_enabled(device),
    };
    Ok((inputs, state))
}

/// Traffic and FLOPs of a drafting phase: a folded feed of `feed` pairs (0: none), the root's
/// output head, then per expansion the drafter over its `fed` nodes (and their output head)
/// after `dp` cached positions.
fn drafting_cost(
    cfg: &StepBenchConfig,
    tc: &Config,
    dc: &DrafterConfig,
    dp: usize,
    feed: usize,
    fed: impl Iterator<Item = usize>,
) -> (f64, f64) {
    let (b, el) = (cfg.batch, cfg.dtype.size_in_bytes());
    let (mut bytes, mut flops) = (
        (tc.vocab_size * tc.dim * el + b * tc.vocab_size * 4) as f64,
        (2 * b * tc.vocab_size * tc.dim) as f64,
    );
    if feed > 0 {
        let (by, fl) = super::cost::feed_cost(dc, b, feed, dp, el);
        bytes += by;
        flops += fl;
    }
    for k in fed {
        let (by, fl) = drafter_cost(dc, b, k, dp, el);
        bytes += by;
        flops += fl;
    }
    (bytes, flops)
}

/// Times the whole drafting phase of a static tree (`naive_extend_57`) as the speculative loop
/// runs it for SD static and LANTERN++ (one computation, a CUDA graph on GPUs) after `dp`
/// cached drafter positions: greedy picks (top-k), or with `sampled` the default sampling
/// (temperature 1: probabilities, then draws without replacement from host uniforms).
/// Traffic and FLOPs: every level's drafter step and output head, plus the root's head.
fn time_drafting(
    cfg: &StepBenchConfig,
    model: &LlamaGen,
    drafter: &Drafter,
    dp: usize,
    sampled: bool,
    time: &Timer,
) -> Result<(f64, f64, f64, String)> {
    use crate::decode::draft_graph::{draft_static_fixed, DraftingKey};
    use crate::decode::TreeShape;
    use crate::sampling::SamplingParams;
    use rand::{RngCore, SeedableRng};
    let (tc, dc) = (model.config(), drafter.config());
    let shape = TreeShape::preset("naive_extend_57")?;
    let feed = folded_feed_width(&crate::decode::TreeSpec::Static(shape.clone()));
    let capacity = dp + 2 * shape.len() + feed;
    let (inp, mut st) = drafting_bench(cfg, model, drafter, dp, capacity)?;
    let n_img = inp.n_img;
    let key = DraftingKey {
        paths: shape.paths.clone(),
        n_img,
        cfg: inp.scale,
        sampling: if sampled {
            SamplingParams::default()
        } else {
            SamplingParams::greedy()
        },
        lm_head: model.lm_head_id(),
        feed,
    };
    let step = inp.step(tc.vocab_size);
    let head = |h: &Tensor| model.lm_head_raw(h);
    let mut rngs: Vec<rand::rngs::StdRng> = (0..n_img as u64)
        .map(rand::rngs::StdRng::seed_from_u64)
        .collect();
    let ms = time(&mut || {
        let fx = st.fx(drafter);
        let mut r: Vec<&mut dyn RngCore> = rngs.iter_mut().map(|r| r as &mut dyn RngCore).collect();
        draft_static_fixed(fx, &head, key.clone(), &shape, &step, &mut r)?.ok_or_else(|| {
            Error::invalid(
                "drafting bench",
                "the shape does not fit the drafting computation",
            )
        })?;
        Ok(())
    })?;
    // fed nodes per level: the nodes of each depth that have children
    let max_depth = shape.max_depth();
    let fed = (1..max_depth).map(|depth| {
        (1..shape.len())
            .filter(|&i| shape.depths[i] == depth && !shape.children(i).is_empty())
            .count()
    });
    let (bytes, flops) = drafting_cost(cfg, tc, dc, dp, feed, fed);
    let how = st.how();
    let name = format!(
        "{DRAFTING_PHASE}, static tree of {} nodes ({} levels, {}{}{how})",
        shape.len(),
        max_depth.saturating_sub(1),
        if sampled { "sampled, " } else { "" },
        fed_first(feed)
    );
    Ok((ms, bytes, flops, name))
}

/// Times the drafting phase of EAGLE-2's dynamic tree (the default parameters: 59 tokens, 4
/// expansions of 10) as the speculative loop runs it for SD and LANTERN dynamic (one
/// computation, a CUDA graph on GPUs, the trees chosen on the device; the loop reads them after
/// verification is queued), greedy,
/// after `dp` cached drafter positions. Traffic and FLOPs: the root's output head, then per
/// expansion the drafter over 10 nodes and their output head.
fn time_dynamic_drafting(
    cfg: &StepBenchConfig,
    model: &LlamaGen,
    drafter: &Drafter,
    dp: usize,
    time: &Timer,
) -> Result<(f64, f64, f64, String)> {
    use crate::decode::dynamic_graph::{draft_dynamic_fixed, DynamicKey};
    use crate::decode::static_trees::DynamicParams;
    use crate::sampling::SamplingParams;
    let (tc, dc) = (model.config(), drafter.config());
    let params = DynamicParams::default();
    let fed = params.depth * params.top_k;
    let feed = folded_feed_width(&crate::decode::TreeSpec::Dynamic(params));
    let capacity = dp + 2 * params.total_tokens + fed + feed;
    let (inp, mut st) = drafting_bench(cfg, model, drafter, dp, capacity)?;
    let key = DynamicKey {
        params,
        n_img: inp.n_img,
        cfg: inp.scale,
        sampling: SamplingParams::greedy(),
        lm_head: model.lm_head_id(),
        feed,
    };
    let step = inp.step(tc.vocab_size);
    let head = |h: &Tensor| model.lm_head_raw(h);
    let ms = time(&mut || {
        let fx = st.fx(drafter);
        draft_dynamic_fixed(fx, &head, key.clone(), &step)?.ok_or_else(|| {
            Error::invalid(
                "drafting bench",
                "the dynamic tree does not fit the drafting computation",
            )
        })?;
        Ok(())
    })?;
    let fed = std::iter::repeat_n(params.top_k, params.depth);
    let (bytes, flops) = drafting_cost(cfg, tc, dc, dp, feed, fed);
    let how = st.how();
    let name = format!(
        "{DRAFTING_PHASE}, dynamic tree of {} tokens ({} expansions of {}, {}{how})",
        params.total_tokens,
        params.depth,
        params.top_k,
        fed_first(feed)
    );
    Ok((ms, bytes, flops, name))
}

/// A drafting row's note of the feed folded into it (see [`crate::decode::feed`]).
fn fed_first(feed: usize) -> String {
    if feed > 0 {
        format!("feed of {feed} folded in, ")
    } else {
        String::new()
    }
}

/// Copy bandwidth in GB/s (read + write bytes), fastest run: the better of an in-place copy into a
/// preallocated buffer and a fresh `Tensor::copy`.
fn measure_copy(cfg: &StepBenchConfig, device: &Device) -> Result<f64> {
    let el = cfg.dtype.size_in_bytes();
    let cols = 1 << 16;
    let rows = (cfg.copy_bytes / el / cols).max(1);
    let src = Tensor::ones((rows, cols), cfg.dtype, device)?;
    let dst = Tensor::zeros((rows, cols), cfg.dtype, device)?;
    let in_place = best_ms(device, cfg.warmup, cfg.iters, || {
        dst.slice_set(&src, 0, 0)?;
        Ok(())
    })?;
    let fresh = best_ms(device, cfg.warmup, cfg.iters, || {
        src.copy()?;
        Ok(())
    })?;
    let moved = 2.0 * (rows * cols * el) as f64;
    let candle_gbps = moved / (in_place.min(fresh) * 1e-3) / 1e9;
    Ok(candle_gbps.max(driver_copy_gbps(cfg, device)?.unwrap_or(0.0)))
}

/// Device-to-device `cuMemcpy` bandwidth (read + write bytes), fastest run: the driver's copy
/// engine path, which reaches closer to the memory's rate than candle's copy kernel.
#[cfg(feature = "cuda")]
fn driver_copy_gbps(cfg: &StepBenchConfig, device: &Device) -> Result<Option<f64>> {
    let Device::Cuda(cuda) = device else {
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    let wrap = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        crate::Error::invalid("copy probe", format!("{e:?}"))
    };
    let src = stream.alloc_zeros::<u8>(cfg.copy_bytes).map_err(wrap)?;
    let mut dst = stream.alloc_zeros::<u8>(cfg.copy_bytes).map_err(wrap)?;
    let ms = best_ms(device, cfg.warmup, cfg.iters, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(wrap)
    })?;
    Ok(Some(2.0 * cfg.copy_bytes as f64 / (ms * 1e-3) / 1e9))
}

#[cfg(not(feature = "cuda"))]
fn driver_copy_gbps(_cfg: &StepBenchConfig, _device: &Device) -> Result<Option<f64>> {
    Ok(None)
}

/// Matmul rate in TFLOP/s of `[n, n] x [n, n]` in the bench dtype, fastest run.
fn measure_matmul(cfg: &StepBenchConfig, device: &Device) -> Result<f64> {
    let n = cfg.matmul_n.max(16);
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(cfg.dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(cfg.dtype)?;
    let t = best_ms(device, cfg.warmup, cfg.iters, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / (t * 1e-3) / 1e12)
}

/// An EAGLE-2-shaped tree of `n` nodes: levels of (up to) 10 nodes, node `i` of a level the
/// child of node `i` of the level above (the root for the first level).
pub fn synthetic_tree(n: usize) -> DraftTree {
    let (mut parents, mut depths) = (vec![0usize], vec![0usize]);
    for i in 1..n {
        let p = i.saturating_sub(10);
        parents.push(p);
        depths.push(depths[p] + 1);
    }
    DraftTree {
        tokens: (0..n as u32).collect(),
        parents,
        depths,
        q: vec![1.0; n],
        q_dists: vec![None; n],
        kind: DraftKind::Deterministic,
    }
}

/// Additive mask `[s, past + s]`: every query sees the whole prefix; `block` (row-major
/// `s * s`) decides within the new tokens.
fn prefix_mask(block: Vec<f32>, s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let prefix = Tensor::zeros((s, past), candle_core::DType::F32, device)?;
    let block = Tensor::from_vec(block, (s, s), device)?;
    Ok(Tensor::cat(&[prefix, block], 1)?)
}

fn check(cfg: &StepBenchConfig, t: &Config, tree: &DraftTree) -> Result<()> {
    let bad = |m: String| Err(Error::invalid("step bench config", m));
    if cfg.batch == 0 || cfg.tree_tokens == 0 || cfg.drafter_tokens == 0 || cfg.iters == 0 {
        return bad("batch, tree_tokens, drafter_tokens and iters must be positive".into());
    }
    if cfg.prefix_len < 2 {
        return bad(format!(
            "prefix_len {} is too short; cache at least 2 positions",
            cfg.prefix_len
        ));
    }
    let deepest = cfg.prefix_len + tree.max_depth();
    if deepest >= t.rope_rows() {
        return bad(format!(
            "prefix_len {} + tree depth {} is past the model's {} positions; use a shorter prefix",
            cfg.prefix_len,
            tree.max_depth(),
            t.rope_rows()
        ));
    }
    Ok(())
}

/// Measures the ceilings and the selected steps of `cfg.preset` with random weights on `device`.
pub fn run_step_bench(cfg: &StepBenchConfig, device: &Device) -> Result<StepReport> {
    let tc = cfg.preset.target();
    let tree = synthetic_tree(cfg.tree_tokens);
    check(cfg, &tc, &tree)?;
    let (b, p, el) = (cfg.batch, cfg.prefix_len, cfg.dtype.size_in_bytes());
    let mut report = StepReport {
        device: format!(
            "{:?} ({:?}, batch {b}, preset {}, random weights)",
            device.location(),
            cfg.dtype,
            cfg.preset.name()
        ),
        copy_gbps: measure_copy(cfg, device)?,
        matmul_tflops: measure_matmul(cfg, device)?,
        rows: Vec::new(),
    };
    let time = |f: &mut dyn FnMut() -> Result<()>| time_ms(device, cfg.warmup, cfg.iters, f);
    let wants = |s: Step| cfg.steps.contains(&s);
    let needs_target = [Step::Decode, Step::Verify, Step::Drafter, Step::KvCompact]
        .iter()
        .any(|&s| wants(s));
    if needs_target {
        let vb = random_var_builder(cfg.dtype, device);
        let model = LlamaGen::load(vb, &tc)?;
        let s = cfg.tree_tokens;
        // the capacities the decoding loops give one image (ar.rs, speculative.rs), so that a
        // fixed-shape step's attention spans what generation's does: the condition and the
        // image, then room for the block and the fixed-shape steps' staging block behind it
        let image = tc.cls_token_num + tc.block_size;
        let mut cache = model.new_cache(b, (p + 2 * s.max(1)).max(image + 2 * s.max(1)))?;
        cache.advance(p);
        if wants(Step::Decode) {
            let mut cache = model.new_cache(b, (p + 2).max(image + 1))?;
            cache.advance(p);
            let ids = Tensor::zeros((b, 1), DType::U32, device)?;
            let pos = Tensor::new(&[p as u32], device)?;
            let ms = time(&mut || {
                cache.truncate(p);
                let x = model.embed_tokens(&ids)?;
                let h = model.forward(&x, &pos, &AttnMask::Causal, &mut cache)?;
                model.lm_head(&h)?;
                Ok(())
            })?;
            let (bytes, flops) = target_cost(&tc, b, 1, p, el);
            report.push(format!("decode 1 tok @{p}"), ms, bytes, flops);
            // the same step with fixed shapes, replayed as a CUDA graph on GPUs (what the
            // decoding loops run there)
            let mask = Tensor::zeros((b, 1, 1, p + 1), DType::F32, device)?;
            let (ms, how) = time_fixed(&model, &mut cache, p, &ids, None, &pos, &mask, &time)?;
            report.push(format!("decode 1 tok @{p} ({how})"), ms, bytes, flops);
        }
        if wants(Step::Verify) {
            let ids: Vec<u32> = (0..b * s).map(|i| (i % tc.vocab_size) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, s), device)?;
            let pos = Tensor::new(tree.positions(p), device)?;
            let mask = AttnMask::Custom(prefix_mask(tree.additive_mask(), s, p, device)?);
            let ms = time(&mut || {
                cache.truncate(p);
                let x = model.embed_tokens(&ids)?;
                let h = model.forward(&x, &pos, &mask, &mut cache)?;
                model.lm_head(&h)?;
                Ok(())
            })?;
            let (bytes, flops) = target_cost(&tc, b, s, p, el);
            let name = format!("verify {s} tok (depth {}) @{p}", tree.max_depth());
            report.push(name.clone(), ms, bytes, flops);
            let AttnMask::Custom(m) = &mask else {
                unreachable!("tree masks are custom")
            };
            let full = m.broadcast_as((b, 1, s, p + s))?.contiguous()?;
            let (ms, how) = time_fixed(&model, &mut cache, p, &ids, None, &pos, &full, &time)?;
            report.push(format!("{name} ({how})"), ms, bytes, flops);
        }
        if wants(Step::KvCompact) {
            // Accept the root and two drafts (or the deepest path a tiny tree has).
            let node = (1..tree.len())
                .find(|&i| tree.depths[i] == 2)
                .unwrap_or(tree.len() - 1);
            let rows = tree.path_to(node);
            let ms = time(&mut || {
                cache.truncate(p);
                cache.advance(s);
                cache.keep(p, &rows)
            })?;
            cache.truncate(p);
            let kv_row = 2 * tc.n_layer * b * tc.n_kv_head * tc.head_dim() * el;
            let bytes = (2 * kv_row * rows.len()) as f64;
            report.push(format!("kv compact {} of {s}", rows.len()), ms, bytes, 0.0);
        }
        if wants(Step::Drafter) {
            let dc = cfg.preset.drafter();
            let drafter = Drafter::load(random_var_builder(cfg.dtype, device), &dc)?;
            drafter.check_target(&tc)?;
            let (n, dp) = (cfg.drafter_tokens, p - 1);
            let mut dcache = drafter.new_cache(b, (dp + 2 * n).max(image + 2 * s.max(n)))?;
            dcache.advance(dp);
            let ids = Tensor::zeros((b, n), DType::U32, device)?;
            let feats = Tensor::randn(0f32, 1.0, (b, n, tc.dim), device)?.to_dtype(cfg.dtype)?;
            let pos = Tensor::new(vec![(dp + 1) as u32; n], device)?;
            let diag: Vec<f32> = (0..n * n)
                .map(|k| {
                    if k / n == k % n {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mask = AttnMask::Custom(prefix_mask(diag, n, dp, device)?);
            let ms = time(&mut || {
                dcache.truncate(dp);
                let h = drafter.forward(&ids, &feats, &pos, &mask, &mut dcache)?;
                model.lm_head(&h)?;
                Ok(())
            })?;
            let (bytes, flops) = drafter_cost(&dc, b, n, dp, el);
            report.push(format!("drafter {n} tok @{dp}"), ms, bytes, flops);
            let AttnMask::Custom(m) = &mask else {
                unreachable!("the level mask is custom")
            };
            let full = m.broadcast_as((b, 1, n, dp + n))?.contiguous()?;
            let (ms, how) = time_fixed(
                &drafter,
                &mut dcache,
                dp,
                &ids,
                Some(&feats),
                &pos,
                &full,
                &time,
            )?;
            report.push(format!("drafter {n} tok @{dp} ({how})"), ms, bytes, flops);
            // greedy first: the expected latency reads the first drafting-phase row
            for sampled in [false, true] {
                let (ms, bytes, flops, name) =
                    time_drafting(cfg, &model, &drafter, dp, sampled, &time)?;
                report.push(name, ms, bytes, flops);
            }
            let (ms, bytes, flops, name) = time_dynamic_drafting(cfg, &model, &drafter, dp, &time)?;
            report.push(name, ms, bytes, flops);
        }
    }
    if wants(Step::VqDecode) {
        let (vc, g) = cfg.preset.vq();
        let vq = VqModel::load(random_var_builder(cfg.dtype, device), &vc)?;
        let codes: Vec<u32> = (0..g * g)
            .map(|i| ((i * 37 + 11) % vc.codebook_size) as u32)
            .collect();
        let codes = Tensor::from_vec(codes, (1, g * g), device)?;
        let ms = time(&mut || {
            vq.decode_codes(&codes, (g, g))?;
            Ok(())
        })?;
        let (params, flops) = vq_decoder_cost(&vc, g);
        let side = g * vc.downsample();
        let bytes = ((params + vc.in_channels * side * side) * el) as f64;
        report.push(
            format!("vq decode {g}x{g} -> {side}px"),
            ms,
            bytes,
            flops as f64,
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(dtype: DType) -> StepBenchConfig {
        StepBenchConfig {
            dtype,
            warmup: 1,
            iters: 3,
            copy_bytes: 4 << 20,
            matmul_n: 256,
            ..StepBenchConfig::new(StepPreset::Tiny, &Device::Cpu)
        }
    }

    fn check_sane(r: &StepReport) {
        assert!(r.copy_gbps.is_finite() && r.copy_gbps > 0.0, "{r}");
        assert!(r.matmul_tflops.is_finite() && r.matmul_tflops > 0.0, "{r}");
        // decode, verify and drafter have two rows: the ordinary step and the fixed-shape
        // (CUDA graph) one; the drafter also the whole drafting phase of a static tree, greedy
        // and sampled, and of a dynamic tree
        assert_eq!(r.rows.len(), Step::ALL.len() + 6, "{r}");
        assert!(
            r.rows
                .iter()
                .any(|x| x.name.contains("dynamic tree of 59 tokens")),
            "{r}"
        );
        assert!(
            r.rows.iter().any(|x| x.name.contains("levels, sampled, ")),
            "{r}"
        );
        let phase = r.rows.iter().find(|x| x.name.starts_with("drafting phase"));
        let phase = phase.unwrap_or_else(|| panic!("no drafting phase row in\n{r}"));
        assert!(
            phase.flops > 4.0 * r.row(Step::Drafter).unwrap().flops,
            "{r}"
        );
        assert!(
            r.rows.iter().any(|x| x.name.ends_with("(fixed shape)")),
            "{r}"
        );
        for s in Step::ALL {
            let row = r
                .row(s)
                .unwrap_or_else(|| panic!("no {} row in\n{r}", s.name()));
            assert!(row.measured_ms > 0.0, "{r}");
            assert!(row.bytes > 0.0, "{r}");
            assert!(row.bound_bw_ms > 0.0, "{r}");
            let e = row.efficiency;
            assert!(e > 0.0 && e <= 1.5, "efficiency {e} of {}\n{r}", row.name);
        }
        assert!(r.row(Step::Verify).unwrap().flops > r.row(Step::Decode).unwrap().flops);
        let table = r.to_string();
        assert_eq!(table.lines().filter(|l| l.starts_with("| ")).count(), 12);
    }

    #[test]
    fn tiny_report_is_complete_and_sane() -> Result<()> {
        let r = run_step_bench(&tiny(DType::F32), &Device::Cpu)?;
        println!("{r}");
        check_sane(&r);
        let lat = expected_latency(&r, 1.2, 2.1, 16);
        let names: Vec<&str> = lat.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["AR", "SD", "LANTERN", "VQ decode"]);
        assert!(lat.iter().all(|(_, v)| *v > 0.0));
        Ok(())
    }

    #[test]
    fn tiny_half_precision_paths_run() -> Result<()> {
        // The GPU runs bf16, which candle's CPU matmul lacks: f16 exercises the same half-precision
        // conversions of every step on the CPU.
        let cfg = StepBenchConfig {
            iters: 1,
            steps: vec![Step::Decode, Step::Verify, Step::Drafter, Step::VqDecode],
            ..tiny(DType::F16)
        };
        let r = run_step_bench(&cfg, &Device::Cpu)?;
        assert_eq!(r.rows.len(), 10, "{r}");
        assert!(r.rows.iter().all(|x| x.measured_ms > 0.0));
        Ok(())
    }

    #[test]
    fn latency_formula() {
        let row = |name: &str, ms: f64| StepRow {
            name: name.into(),
            measured_ms: ms,
            bytes: 1.0,
            flops: 1.0,
            bound_bw_ms: 0.5,
            bound_flops_ms: 0.1,
            efficiency: 0.5 / ms,
        };
        let mut r = StepReport {
            device: "test".into(),
            copy_gbps: 1.0,
            matmul_tflops: 1.0,
            rows: vec![
                row("decode 1 tok", 10.0),
                row("verify 59 tok", 12.0),
                row("drafter 10 tok", 2.0),
                row("kv compact 3", 1.0),
            ],
        };
        let lat = expected_latency(&r, 2.0, 4.0, 256);
        assert_eq!(lat[0], ("AR".into(), 2560.0));
        assert_eq!(lat[1], ("SD".into(), 128.0 * 23.0));
        assert_eq!(lat[2], ("LANTERN".into(), 64.0 * 23.0));
        assert_eq!(lat.len(), 3);
        // a measured drafting phase replaces the levels' estimate
        r.rows.push(row("drafting phase, static tree", 5.0));
        let lat = expected_latency(&r, 2.0, 4.0, 256);
        assert_eq!(lat[1], ("SD".into(), 128.0 * 18.0));
        r.rows.retain(|x| !x.name.starts_with("drafter"));
        assert_eq!(expected_latency(&r, 2.0, 4.0, 256).len(), 1);
    }

    #[test]
    fn vq_cost_counts_the_decoder_parameters() -> candle_core::Result<()> {
        // The analytic walk must match what `VqModel::load` creates under the decoder names.
        for (cfg, grid) in [
            (VqConfig::fashion_small(), 4),
            (
                VqConfig {
                    ch: 32,
                    ch_mult: vec![1, 2, 2],
                    ..VqConfig::vq16()
                },
                3,
            ),
        ] {
            let vm = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            VqModel::load(vb, &cfg)?;
            let data = vm
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("lock".into()))?;
            let want: usize = data
                .iter()
                .filter(|(k, _)| k.starts_with("decoder.") || k.starts_with("post_quant_conv."))
                .map(|(_, v)| v.elem_count())
                .sum();
            let (params, flops) = vq_decoder_cost(&cfg, grid);
            assert_eq!(params, want);
            assert!(flops > 2 * params * grid * grid);
        }
        // VQ-16 decoder: ~42M parameters.
        let (p, _) = vq_decoder_cost(&VqConfig::vq16(), 16);
        assert!((40_000_000..45_000_000).contains(&p), "{p}");
        Ok(())
    }

    #[test]
    fn presets_parse_and_fit() -> Result<()> {
        for name in ["t2i-xl-256", "c2i-xl-384", "tiny"] {
            let p: StepPreset = name.parse()?;
            assert_eq!(p.name(), name);
            let cfg = StepBenchConfig::new(p, &Device::Cpu);
            let t = p.target();
            t.validate()?;
            check(&cfg, &t, &synthetic_tree(cfg.tree_tokens))?;
            assert_eq!(p.vq().1 * p.vq().1, t.block_size);
            assert_eq!(p.drafter().block_size, t.block_size);
        }
        assert!("xl".parse::<StepPreset>().is_err());
        let t = StepPreset::T2iXl256.target();
        let bad = StepBenchConfig {
            prefix_len: t.rope_rows() - 2,
            ..StepBenchConfig::new(StepPreset::T2iXl256, &Device::Cpu)
        };
        assert!(check(&bad, &t, &synthetic_tree(59)).is_err());
        let tree = synthetic_tree(59);
        tree.validate()?;
        assert_eq!(tree.max_depth(), 6);
        Ok(())
    }

    /// The XL decode step on this CPU in f32 (3.1 GB of weights): run with
    /// `cargo test -p lantern --lib bench::steps::tests::xl_decode_cpu -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn xl_decode_cpu() -> Result<()> {
        let cfg = StepBenchConfig {
            steps: vec![Step::Decode],
            matmul_n: 1024,
            copy_bytes: 256 << 20,
            iters: 3,
            ..StepBenchConfig::new(StepPreset::T2iXl256, &Device::Cpu)
        };
        let t0 = Instant::now();
        let r = run_step_bench(&cfg, &Device::Cpu)?;
        println!("{r}\n(total {:.1} s)", t0.elapsed().as_secs_f64());
        Ok(())
    }
}
