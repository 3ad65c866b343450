//! Launches of the drafting-pick kernels (`kernels.cu`, section "drafting picks") for
//! [`super::picks`]: one block per row (`PK_PROBS_THREADS` threads for the probabilities,
//! `PK_THREADS` for the picks).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result};

use super::cuda::{launch_cfg, offsets, suffix, typed, MODULE, PTX};
use crate::sampling::SamplingParams;
use candle_core::{bail, DType};

/// `PK_THREADS` in the kernels.
const THREADS: u32 = 512;
/// `PK_PROBS_THREADS` in the kernels.
const PROBS_THREADS: u32 = 1024;

/// One block of `threads` per row.
fn per_row(n: usize, threads: u32) -> LaunchConfig {
    launch_cfg((n as u32, 1, 1), threads, 0)
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
    let func = dev.get_or_load_custom_func(&format!("draft_probs_{}", suffix(dt)?), MODULE, PTX)?;
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
        // SAFETY: argument list matches the kernel's signature; both row sets are [n, v] of T.
        unsafe { builder.launch(per_row(n, PROBS_THREADS)) }.w()?;
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
    let func = dev.get_or_load_custom_func("draft_draw_f32", MODULE, PTX)?;
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
    // SAFETY: argument list matches the kernel's signature; k <= PK_MAX (checked in picks.rs).
    unsafe { builder.launch(per_row(n, THREADS)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
