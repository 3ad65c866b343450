//! Launches of the split-K kernels (`split_k.cu`) for [`super::split_k`].
use candle_core::backend::BackendStorage;
use candle_core::{bail, CudaStorage, DType, Layout, Result};

use super::cuda::{allow_shared, launch_cfg, offsets, sm_count, suffix, typed, wrap};
use super::launch::Launch;
use super::split_k::{SplitDims, NORM_MAX_COLS, SLICE_COLS as COLS};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/split_k.ptx"));
const MODULE: &str = "lantern_split_k";

/// `SK_WARPS * 32` in the kernel.
const THREADS: u32 = 128;
/// The largest band (8 m16 tiles), `SK_KS`, `SK_PAD` in the kernel.
const BAND: usize = 128;
const MAX_SLICE: usize = 256;
const PAD: usize = 32;

/// The slice length for a product: `forced` (128 or 256), else 256 where that already gives
/// every SM a block, else 128 (GPT-XL's `wo`: 100 blocks at 256, 200 at 128).
fn slice_len(d: SplitDims, forced: usize, sms: usize) -> usize {
    if forced != 0 {
        return forced;
    }
    let blocks = (d.n / COLS) * d.k.div_ceil(MAX_SLICE) * d.rows.div_ceil(BAND);
    if blocks >= sms {
        MAX_SLICE
    } else {
        MAX_SLICE / 2
    }
}

/// Partial products `[slices, rows, n]` f32 and the number of slices.
pub(super) fn linear(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    d: SplitDims,
    forced: usize,
) -> Result<(CudaStorage, usize)> {
    let dev = x.device().clone();
    let dt = x.dtype();
    if w.dtype() != dt || !matches!(dt, DType::BF16 | DType::F16) {
        bail!(
            "split-k linear: input {dt:?} and weight {:?} (bf16 or f16 only)",
            w.dtype()
        );
    }
    if !d.k.is_multiple_of(32) || !d.n.is_multiple_of(COLS) {
        bail!(
            "split-k linear: k {} (a multiple of 32) and n {} (of {COLS})",
            d.k,
            d.n
        );
    }
    let ks = slice_len(d, forced, sm_count(&dev)?);
    let slices = d.k.div_ceil(ks);
    // m16 tiles per band: the fewest of 1, 2, 4, 8 that hold the rows (bands of 128 beyond)
    let tiles = d.rows.min(BAND).div_ceil(16).next_power_of_two();
    let shared = 16 * tiles * (ks + PAD) * dt.size_in_bytes();
    let name = format!("split_k_linear_{tiles}_{}", suffix(dt)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    allow_shared(&dev, &func, &name, BAND * (MAX_SLICE + PAD) * 2, 100)?;
    let grid = (
        (d.n / COLS) as u32,
        slices as u32,
        d.rows.div_ceil(16 * tiles) as u32,
    );
    typed!(dt, T => {
        let (a, b) = offsets(xl)?;
        let xs = x.as_cuda_slice::<T>()?.slice(a..b);
        let (a, b) = offsets(wl)?;
        if !(a * std::mem::size_of::<T>()).is_multiple_of(16) {
            bail!("split-k linear: the weight view is not 16-byte aligned");
        }
        let ws = w.as_cuda_slice::<T>()?.slice(a..b);
        // SAFETY: every element is written: the blocks cover all columns, rows and slices.
        let parts = unsafe { dev.alloc::<f32>(slices * d.rows * d.n)? };
        let (m, k, n, ks) = (d.rows as i32, d.k as i32, d.n as i32, ks as i32);
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(&xs);
        builder.arg(&ws);
        builder.arg(&parts);
        builder.arg(&m);
        builder.arg(&k);
        builder.arg(&n);
        builder.arg(&ks);
        // SAFETY: argument list matches the kernel's signature; the grid covers n / COLS column
        // blocks, the slices and the bands, and the kernel guards rows and the last slice.
        unsafe { builder.launch(launch_cfg(grid, THREADS, shared)) }?;
        Ok((wrap(parts, &dev), slices))
    })
}

/// `[2, rows, n]`: the residual sums and their norms, from the slices `p` `[slices, rows, n]`.
pub(super) fn add_norm_parts(
    eps: f32,
    p: &CudaStorage,
    pl: &Layout,
    r: &CudaStorage,
    rl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let dt = r.dtype();
    let (slices, rows, cols) = pl.shape().dims3()?;
    if rl.shape().elem_count() != rows * cols || wl.shape().elem_count() != cols {
        bail!(
            "add-norm-parts: slices {:?}, residual {:?}, weight {:?} do not fit",
            pl.dims(),
            rl.dims(),
            wl.dims()
        );
    }
    if !cols.is_multiple_of(4) || cols > NORM_MAX_COLS {
        bail!("add-norm-parts: rows of {cols} (a multiple of 4, at most {NORM_MAX_COLS})");
    }
    let func =
        dev.get_or_load_custom_func(&format!("add_norm_parts_{}", suffix(dt)?), MODULE, PTX)?;
    typed!(dt, T => {
        let (a, b) = offsets(pl)?;
        if a % 4 != 0 {
            bail!("add-norm-parts: the slices' view is not 16-byte aligned");
        }
        let ps = p.as_cuda_slice::<f32>()?.slice(a..b);
        let (a, b) = offsets(rl)?;
        let (c, d) = offsets(wl)?;
        if a % 4 != 0 || c % 4 != 0 {
            bail!("add-norm-parts: the residual or norm weight view is not 8-byte aligned");
        }
        let rs = r.as_cuda_slice::<T>()?.slice(a..b);
        let ws = w.as_cuda_slice::<T>()?.slice(c..d);
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(2 * rows * cols)? };
        let threads = (cols / 4).div_ceil(32).clamp(1, 32) as u32 * 32;
        let (s, rows_i, cols_i) = (slices as i32, rows as i32, cols as i32);
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(&ps);
        builder.arg(&s);
        builder.arg(&rs);
        builder.arg(&ws);
        builder.arg(&out);
        builder.arg(&rows_i);
        builder.arg(&cols_i);
        builder.arg(&eps);
        // SAFETY: argument list matches the kernel's signature; one block per row.
        unsafe { builder.launch(launch_cfg((rows as u32, 1, 1), threads, cols * 4)) }?;
        Ok(wrap(out, &dev))
    })
}
