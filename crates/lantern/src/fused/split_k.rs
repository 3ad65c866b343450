//! A projection of many rows followed by the residual add and RMSNorm, with the product's sum
//! over `k` split into slices: `wo` before the FFN norm and `w2` (after SiLU-mul) before the
//! next block's norm, in tree verification and prefill.
//!
//! The projection's kernel writes one f32 partial product per slice of `k` (`[slices, rows,
//! n]`), so that a narrow output (GPT-XL's 1,280 columns) still spreads over every SM; the norm
//! that follows sums the slices in slice order, rounds the product to the model dtype, adds the
//! residual and normalises: the numerics of `add_rms_norm(x wᵀ, residual)` but for the
//! product's summation order. On CUDA both are our kernels (`split_k.cu`, tensor cores, bf16 or
//! f16): no cuBLAS call, and programmatic dependent launch across them.
//! On a CPU thread under [`super::force_on_cpu`] the same algorithm runs as loops (any float
//! dtype), so CPU tests cover the block's wiring.
//!
//! Off by default: on an H200 at GPT-XL's verification shapes (118 rows) the pair measured
//! slower than cuBLAS plus the separate norm (`wo` 9.5 vs 7.5 µs, `w2` with SiLU-mul 20.7 vs
//! 12.9 µs; docs/BENCHMARKS.md §00000012). `LANTERN_SPLIT_K=1` turns it on (`128` / `256`
//! also force the slice length), [`set_split_k`] per thread.
use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};

/// Most rows one call serves (two bands of 128 rows on CUDA); more take the separate ops.
pub const SPLIT_K_MAX_ROWS: usize = 256;
/// Slice length of the CPU version (short, so that small test models have several slices).
const CPU_SLICE: usize = 16;

/// `add_rms_norm(x wᵀ, residual)` (with `swiglu`, `x` holds gate/up rows `[.., 2k]` and the
/// product takes `silu_mul(x)`): `(h, rms_norm(h) * weight)`, the projection's sum over `k`
/// split into slices where [`serves`] says so, else the separate ops.
///
/// # Shapes
/// - `x`: `[.., k]` (`[.., 2k]` with `swiglu`); `lin`: weight `[n, k]`, no bias; `residual`:
///   `[.., n]`; `weight`: `[n]` → (`h`, normed), both `[.., n]`
pub fn linear_add_rms_norm(
    x: &Tensor,
    lin: &candle_nn::Linear,
    swiglu: bool,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let x = if swiglu {
        super::silu_mul(x)?
    } else {
        x.clone()
    };
    if let Some(slice) = serves(&x, lin, residual)? {
        let x = super::aligned(&x)?;
        let parts = x.apply_op2_no_bwd(lin.weight(), &SplitKLinear { slice })?;
        let out =
            parts.apply_op3_no_bwd(&super::aligned(residual)?, weight, &AddNormParts { eps })?;
        return Ok((out.get(0)?, out.get(1)?));
    }
    super::add_rms_norm(&super::linear(lin, &x)?, residual, weight, eps)
}

thread_local! {
    static ON_HERE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Turns the split path on or off for this thread (`None`: `LANTERN_SPLIT_K` decides, off by
/// default): tests and the kernel bench run both paths in one process.
pub fn set_split_k(on: Option<bool>) {
    ON_HERE.with(|c| c.set(on));
}

/// `LANTERN_SPLIT_K`: `None` off (unset, `0`), else `Some(slice)` (`1`: 0, chosen at launch;
/// `128`, `256`: forced).
fn setting() -> Option<usize> {
    static S: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *S.get_or_init(|| match std::env::var("LANTERN_SPLIT_K").ok().as_deref() {
        Some("1") => Some(0),
        Some("128") => Some(128),
        Some("256") => Some(256),
        _ => None,
    })
}

/// Whether the split path is on here, and its forced slice length (0: chosen at launch).
fn enabled() -> Option<usize> {
    match ON_HERE.with(|c| c.get()) {
        Some(true) => Some(setting().unwrap_or(0)),
        Some(false) => None,
        None => setting(),
    }
}

/// Whether [`linear_add_rms_norm`] takes the split path for these inputs, and its slice length
/// (`None`: the separate ops).
fn serves(x: &Tensor, lin: &candle_nn::Linear, residual: &Tensor) -> Result<Option<usize>> {
    let w = lin.weight();
    let Some(forced) = enabled() else {
        return Ok(None);
    };
    if !super::active(x)
        || lin.bias().is_some()
        || w.track_op()
        || residual.track_op()
        || w.rank() != 2
        || w.dtype() != x.dtype()
        || residual.dtype() != x.dtype()
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let xk = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / xk.max(1);
    let fits = xk == k
        && (1..=SPLIT_K_MAX_ROWS).contains(&rows)
        && residual.dims().last() == Some(&n)
        && residual.elem_count() == rows * n;
    if !fits {
        return Ok(None);
    }
    Ok(match x.device() {
        Device::Cpu => Some(CPU_SLICE),
        Device::Cuda(_) => {
            let kernel_fits = matches!(x.dtype(), DType::BF16 | DType::F16)
                && w.is_contiguous()
                && k.is_multiple_of(32)
                && n.is_multiple_of(SLICE_COLS)
                && n <= NORM_MAX_COLS;
            // 0 = chosen at launch, by the SM count
            kernel_fits.then_some(forced)
        }
        _ => None,
    })
}

/// Output columns of one CUDA block (`SK_BN` in the kernel).
pub(super) const SLICE_COLS: usize = 64;
/// Longest rows the CUDA norm of the slices takes (a row of f32 in 48 KiB of shared memory).
pub(super) const NORM_MAX_COLS: usize = 12 * 1024;

/// Partial products `[slices, rows, n]` f32 of `x wᵀ` (see [`linear_add_rms_norm`]).
struct SplitKLinear {
    /// Slice length; 0 = chosen at launch.
    slice: usize,
}

/// Sizes of one split product.
#[derive(Clone, Copy, Debug)]
pub(super) struct SplitDims {
    pub(super) rows: usize,
    pub(super) k: usize,
    pub(super) n: usize,
}

impl SplitKLinear {
    fn dims(&self, xl: &Layout, wl: &Layout) -> Result<SplitDims> {
        let (n, k) = wl.shape().dims2()?;
        let xk = *xl.dims().last().unwrap_or(&0);
        if xk != k || k == 0 {
            bail!(
                "split-k linear: input {:?} and weight {:?} do not fit",
                xl.dims(),
                wl.dims()
            );
        }
        Ok(SplitDims {
            rows: xl.shape().elem_count() / k,
            k,
            n,
        })
    }
}

impl CustomOp2 for SplitKLinear {
    fn name(&self) -> &'static str {
        "lantern-split-k-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(xl, wl)?;
        let slice = if self.slice == 0 {
            CPU_SLICE
        } else {
            self.slice
        };
        let parts = match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => cpu_parts(x, xl, w, wl, d, slice)?,
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => cpu_parts(x, xl, w, wl, d, slice)?,
            (CpuStorage::F16(x), CpuStorage::F16(w)) => cpu_parts(x, xl, w, wl, d, slice)?,
            _ => bail!(
                "split-k linear: input {:?} vs weight {:?}",
                x.dtype(),
                w.dtype()
            ),
        };
        let slices = d.k.div_ceil(slice);
        Ok((CpuStorage::F32(parts), Shape::from((slices, d.rows, d.n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dims(xl, wl)?;
        let (parts, slices) = super::split_k_cuda::linear(x, xl, w, wl, d, self.slice)?;
        Ok((parts, Shape::from((slices, d.rows, d.n))))
    }
}

/// The CPU version of the split product: slice `s` sums `k` in `[s slice, (s + 1) slice)` in
/// order, in f32.
fn cpu_parts<T: WithDType>(
    x: &[T],
    xl: &Layout,
    w: &[T],
    wl: &Layout,
    d: SplitDims,
    slice: usize,
) -> Result<Vec<f32>> {
    let x = super::cpu::contiguous(x, xl)?;
    let w = super::cpu::contiguous(w, wl)?;
    let f = |v: T| v.to_f64() as f32;
    let slices = d.k.div_ceil(slice);
    let mut out = vec![0f32; slices * d.rows * d.n];
    for s in 0..slices {
        let (lo, hi) = (s * slice, ((s + 1) * slice).min(d.k));
        for m in 0..d.rows {
            for n in 0..d.n {
                let (xr, wr) = (&x[m * d.k..], &w[n * d.k..]);
                out[(s * d.rows + m) * d.n + n] = (lo..hi).map(|j| f(xr[j]) * f(wr[j])).sum();
            }
        }
    }
    Ok(out)
}

/// `(h, rms_norm(h) * weight)` with `h = round(round(sum of the slices) + residual)`, stacked
/// `[2, .., n]` (see [`linear_add_rms_norm`]).
struct AddNormParts {
    eps: f32,
}

impl CustomOp3 for AddNormParts {
    fn name(&self) -> &'static str {
        "lantern-add-norm-parts"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (slices, rows, n) = pl.shape().dims3()?;
        let CpuStorage::F32(p) = p else {
            bail!("add-norm-parts: the slices are {:?}, not f32", p.dtype());
        };
        let p = super::cpu::contiguous(p, pl)?;
        // the slices' sum in slice order, rounded to the model dtype like a product's output
        let sum: Vec<f32> = (0..rows * n)
            .map(|i| (0..slices).fold(0f32, |acc, s| acc + p[s * rows * n + i]))
            .collect();
        let x = Tensor::from_vec(sum, (rows, n), &Device::Cpu)?.to_dtype(r.dtype())?;
        let (xs, xl) = x.storage_and_layout();
        let candle_core::Storage::Cpu(xs) = &*xs else {
            bail!("add-norm-parts: the sum is not on the CPU");
        };
        let out = super::cpu::norm(self.eps, xs, xl, Some((r, rl)), w, wl)?;
        Ok((out, super::stacked(rl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::split_k_cuda::add_norm_parts(self.eps, p, pl, r, rl, w, wl)?;
        Ok((out, super::stacked(rl)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split path (CPU loops, several slices) against the separate ops, per dtype: the same
    /// products up to their summation order.
    #[test]
    fn split_path_matches_separate_ops() -> Result<()> {
        let dev = Device::Cpu;
        super::super::force_on_cpu(true);
        set_split_k(Some(true));
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (rows, k, n, swiglu) in [(3, 200, 64, false), (17, 96, 40, true), (1, 64, 8, false)]
            {
                let xk = if swiglu { 2 * k } else { k };
                let x = Tensor::randn(0f32, 1.0, (rows, xk), &dev)?.to_dtype(dtype)?;
                let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? / (k as f64).sqrt())?
                    .to_dtype(dtype)?;
                let res = Tensor::randn(0f32, 1.0, (rows, n), &dev)?.to_dtype(dtype)?;
                let nw = Tensor::randn(1f32, 0.1, n, &dev)?.to_dtype(dtype)?;
                let lin = candle_nn::Linear::new(w, None);
                let xin = if swiglu {
                    super::super::silu_mul(&x)?
                } else {
                    x.clone()
                };
                assert!(serves(&xin, &lin, &res)?.is_some());
                let (h, y) = linear_add_rms_norm(&x, &lin, swiglu, &res, &nw, 1e-5)?;
                let p = candle_core::Module::forward(&lin, &xin)?;
                let (h0, y0) = super::super::add_rms_norm(&p, &res, &nw, 1e-5)?;
                for (a, b, what) in [(&h, &h0, "h"), (&y, &y0, "normed")] {
                    assert_eq!(a.dims(), b.dims());
                    let a = a.to_dtype(DType::F32)?;
                    let b = b.to_dtype(DType::F32)?;
                    let err = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(
                        err <= tol * scale,
                        "{dtype:?} rows {rows} k {k} n {n} swiglu {swiglu}: {what} off by {err} (scale {scale})"
                    );
                }
            }
        }
        super::super::force_on_cpu(false);
        set_split_k(None);
        Ok(())
    }
}
