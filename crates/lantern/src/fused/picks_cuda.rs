//! Launches of the drafting-pick kernels (`kernels.cu`, section "drafting picks") for
//! [`super::picks`]: one block per row (`PK_PROBS_THREADS` threads for the probabilities,
//! `PK_THREADS` for the picks), or on Hopper and later for rows of [`CLUSTER_MIN`] codes and
//! more, a thread-block cluster of [`CLUSTER`] blocks per row (probabilities and draws; see
//! [`set_cluster_picks`]).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result};

use super::cuda::{launch_cfg, offsets, suffix, typed, MODULE, PTX};
use crate::sampling::SamplingParams;
use candle_core::{bail, DType};
use std::sync::atomic::{AtomicU8, Ordering};

/// `PK_THREADS` in the kernels.
const THREADS: u32 = 512;
/// `PK_PROBS_THREADS` in the kernels.
const PROBS_THREADS: u32 = 1024;

/// `PK_CL` in the kernels: blocks of a row's cluster.
const CLUSTER: u32 = 8;
/// `PK_CL_THREADS` in the kernels.
const CLUSTER_THREADS: u32 = 256;
/// Shortest rows given to the cluster kernels (shorter ones keep one block busy enough).
const CLUSTER_MIN: usize = 2048;

/// One block of `threads` per row.
fn per_row(n: usize, threads: u32) -> LaunchConfig {
    launch_cfg((n as u32, 1, 1), threads, 0)
}

/// One cluster of [`CLUSTER`] blocks per row (the kernels fix the cluster's size).
fn cluster_per_row(n: usize) -> LaunchConfig {
    launch_cfg((CLUSTER, n as u32, 1), CLUSTER_THREADS, 0)
}

/// Which rows the drafting picks give to the cluster kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterPicks {
    /// None: one block per row.
    Off,
    /// Rows of [`CLUSTER_MIN`] codes and more (the default).
    LongRows,
    /// Every row (tests and A/B runs on small vocabularies).
    AllRows,
}

/// [`set_cluster_picks`]'s setting: 0 = not set (the environment decides), else the mode + 1.
static CLUSTER_SETTING: AtomicU8 = AtomicU8::new(0);

/// Sets which rows take the cluster kernels in this process, over the environment:
/// `LANTERN_PICKS_CLUSTER=0` (off), `=all` (every row), else long rows. The PTX must be built
/// for compute capability 9.0 or later (`CUDA_COMPUTE_CAP`): older ones have no clusters and
/// always take the one-block kernels.
pub fn set_cluster_picks(mode: ClusterPicks) {
    CLUSTER_SETTING.store(mode as u8 + 1, Ordering::Relaxed);
}

/// Whether a row of `v` codes goes to the cluster kernels.
fn cluster_row(v: usize) -> bool {
    // the PTX has the cluster kernels only when built for compute capability 9.0 or later
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static FROM_ENV: std::sync::OnceLock<ClusterPicks> = std::sync::OnceLock::new();
    if !*BUILT.get_or_init(|| {
        env!("LANTERN_PTX_CAP")
            .parse::<u32>()
            .is_ok_and(|c| c >= 90)
    }) {
        return false;
    }
    let mode = match CLUSTER_SETTING.load(Ordering::Relaxed) {
        1 => ClusterPicks::Off,
        2 => ClusterPicks::LongRows,
        3 => ClusterPicks::AllRows,
        _ => *FROM_ENV.get_or_init(|| match std::env::var("LANTERN_PICKS_CLUSTER").as_deref() {
            Ok("0") => ClusterPicks::Off,
            Ok("all") => ClusterPicks::AllRows,
            _ => ClusterPicks::LongRows,
        }),
    };
    match mode {
        ClusterPicks::Off => false,
        ClusterPicks::LongRows => v >= CLUSTER_MIN,
        ClusterPicks::AllRows => true,
    }
}

/// Probabilities of the rows of `x`, CFG-combined with `uncond` (storage, layout, scale) first
/// when given.
pub(super) fn probs(
    sampling: &SamplingParams,
    x: &CudaStorage,
    l: &Layout,
    n: usize,
    v: usize,
    uncond: Option<(&CudaStorage, &Layout, f32)>,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let dt = x.dtype();
    if uncond.is_some_and(|(u, _, _)| u.dtype() != dt) {
        bail!("drafting probabilities: CFG halves of different dtypes");
    }
    let cl = cluster_row(v);
    let name = format!("draft_probs_{}{}", if cl { "cl_" } else { "" }, suffix(dt)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n * v)? };
    let (temp, top_k) = if sampling.is_greedy() {
        (1f32, 0i32)
    } else {
        (sampling.temperature.max(1e-5), sampling.top_k.min(v) as i32)
    };
    let scale = uncond.map_or(1f32, |(_, _, s)| s);
    let null = 0u64;
    let v = v as i32;
    typed!(dt, T => {
        let (a, b) = offsets(l)?;
        let src = x.as_cuda_slice::<T>()?.slice(a..b);
        let usrc = match uncond {
            Some((u, ul, _)) => {
                let (a, b) = offsets(ul)?;
                Some(u.as_cuda_slice::<T>()?.slice(a..b))
            }
            None => None,
        };
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        builder.arg(&v);
        builder.arg(&temp);
        builder.arg(&top_k);
        match &usrc {
            Some(u) => builder.arg(u),
            None => builder.arg(&null),
        };
        builder.arg(&scale);
        let cfg = if cl { cluster_per_row(n) } else { per_row(n, PROBS_THREADS) };
        // SAFETY: argument list matches the kernel's signature; both row sets are [n, v] of T.
        unsafe { builder.launch(cfg) }.w()?;
    });
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn top_k(
    p: &CudaStorage,
    l: &Layout,
    n: usize,
    v: usize,
    k: usize,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let func = dev.get_or_load_custom_func("draft_top_k_f32", MODULE, PTX)?;
    let (a, b) = offsets(l)?;
    let src = p.as_cuda_slice::<f32>()?.slice(a..b);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n * k * 2)? };
    let (v, k) = (v as i32, k as i32);
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&out);
    builder.arg(&v);
    builder.arg(&k);
    // SAFETY: argument list matches the kernel's signature.
    unsafe { builder.launch(per_row(n, THREADS)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn draw(
    p: &CudaStorage,
    l: &Layout,
    us: &CudaStorage,
    ul: &Layout,
    n: usize,
    v: usize,
    k: usize,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let cl = cluster_row(v);
    let name = if cl {
        "draft_draw_cl_f32"
    } else {
        "draft_draw_f32"
    };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let (a, b) = offsets(l)?;
    let src = p.as_cuda_slice::<f32>()?.slice(a..b);
    let (a, b) = offsets(ul)?;
    let uni = us.as_cuda_slice::<f64>()?.slice(a..b);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n * k * 2)? };
    let (v, k) = (v as i32, k as i32);
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&uni);
    builder.arg(&out);
    builder.arg(&v);
    builder.arg(&k);
    let cfg = if cl {
        cluster_per_row(n)
    } else {
        per_row(n, THREADS)
    };
    // SAFETY: argument list matches the kernel's signature; k <= PK_MAX (checked in picks.rs).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// See [`super::picks::pick_tokens`]: `m` indices into the picks, `reps` copies. Indices past
/// the picks read token 0 (the CPU version errors; the callers' indices are built in range).
pub(super) fn pick_tokens(
    p: &CudaStorage,
    l: &Layout,
    at: &CudaStorage,
    al: &Layout,
    m: usize,
    reps: usize,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let func = dev.get_or_load_custom_func("pick_tokens_f32", MODULE, PTX)?;
    let (a, b) = offsets(l)?;
    let src = p.as_cuda_slice::<f32>()?.slice(a..b);
    let (a2, b2) = offsets(al)?;
    let idx = at.as_cuda_slice::<u32>()?.slice(a2..b2);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<u32>(m * reps)? };
    let (n, m, reps) = ((b - a) as i32, m as i32, reps as i32);
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&n);
    builder.arg(&idx);
    builder.arg(&out);
    builder.arg(&m);
    builder.arg(&reps);
    let total = (m * reps).max(1) as u32;
    // SAFETY: argument list matches pick_tokens_f32's signature; out holds m * reps elements.
    unsafe { builder.launch(launch_cfg((total.div_ceil(256), 1, 1), 256, 0)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// See [`super::picks::frontier`]: one block per image.
pub(super) fn frontier(
    p: &CudaStorage,
    l: &Layout,
    base: &CudaStorage,
    bl: &Layout,
    lay: &super::picks::FrontierLayout,
    stride: usize,
    slot_base: Option<usize>,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let func = dev.get_or_load_custom_func("frontier_f32", MODULE, PTX)?;
    let (a, b) = offsets(l)?;
    let src = p.as_cuda_slice::<f32>()?.slice(a..b);
    let (a2, b2) = offsets(bl)?;
    let bs = base.as_cuda_slice::<u32>()?.slice(a2..b2);
    // SAFETY: every element is written by the kernel (each section in full).
    let out = unsafe { dev.alloc::<u32>(lay.len())? };
    let args: [i32; 7] = [
        lay.n_img as i32,
        lay.rows_per_img as i32,
        lay.k as i32,
        lay.keep as i32,
        lay.rows as i32,
        stride as i32,
        slot_base.map_or(-1, |b| b as i32),
    ];
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&bs);
    builder.arg(&out);
    for x in &args {
        builder.arg(x);
    }
    // keys and kept flags of a block's candidates
    let shared = lay.cands() * (std::mem::size_of::<u32>() + std::mem::size_of::<i32>());
    // SAFETY: argument list matches frontier_f32's signature; out holds lay.len() words.
    unsafe { builder.launch(launch_cfg((lay.n_img as u32, 1, 1), 256, shared)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// See [`super::picks::select_tree`]: one block per image.
pub(super) fn select_tree(
    f: &CudaStorage,
    l: &Layout,
    r: &CudaStorage,
    rl: &Layout,
    lv: &super::picks::DynamicLevels,
) -> Result<CudaStorage> {
    let dev = f.device().clone();
    let func = dev.get_or_load_custom_func("select_tree_f32", MODULE, PTX)?;
    let (a, b) = offsets(l)?;
    let fronts = f.as_cuda_slice::<u32>()?.slice(a..b);
    let (a2, b2) = offsets(rl)?;
    let roots = r.as_cuda_slice::<u32>()?.slice(a2..b2);
    let n = lv.cols();
    // SAFETY: every element is written by the kernel (each image's rows in full).
    let out = unsafe { dev.alloc::<f32>(lv.n_img * (3 + n) * n)? };
    let args: [i32; 5] = [
        lv.n_img as i32,
        lv.k as i32,
        lv.depth as i32,
        lv.rows as i32,
        n as i32,
    ];
    let mut builder = func.builder();
    builder.arg(&fronts);
    builder.arg(&roots);
    builder.arg(&out);
    for x in &args {
        builder.arg(x);
    }
    // keys and columns of a block's candidates, parent columns of its tree
    let shared = (2 * lv.cands() + n) * std::mem::size_of::<u32>();
    // SAFETY: argument list matches select_tree_f32's signature; out holds n_img (3 + n) n
    // floats; the candidates fit MAX_SELECT_CANDS (checked by the caller).
    unsafe { builder.launch(launch_cfg((lv.n_img as u32, 1, 1), 256, shared)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
