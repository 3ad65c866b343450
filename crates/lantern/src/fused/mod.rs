//! Fused inference kernels for the transformer blocks (LlamaGen and the drafter): RMSNorm with
//! the residual add, SwiGLU's `silu(gate) * up`, RoPE + K/V cache write, and masked attention
//! that reads queries straight from the `wqkv` output and keys from the cache.
//!
//! For decode steps (a few rows) [`small_linear`] streams a weight matrix with the RMSNorm in
//! front and the residual add or SwiGLU behind, and on CUDA [`small_linear_kv`] also writes the
//! new keys and values into the cache from the `wqkv` product, so that a LlamaGen block is 5
//! launches (about 29 with candle's ops); tree verification keeps cuBLAS for the projections,
//! and [`attention_write_kv`] writes the new keys and values inside its attention (8 launches).
//!
//! On CUDA these are our own kernels (`kernels.cu`, compiled to PTX by build.rs). Each op also
//! has a CPU version of the same algorithm, so that tests on machines without a GPU check the
//! fused forward against the op-by-op reference ([`force_on_cpu`]); `tests/fused_forward.rs`
//! compares the CUDA kernels with the CPU reference when built with `--features cuda`.
//!
//! Numerics follow LlamaGen: norms and rotations in f32 with the same roundings to the model
//! dtype as the reference; attention accumulates in f32 without the reference's intermediate
//! rounding of the scores (like any fused attention); the CUDA kernel for many queries rounds the
//! probabilities to the model dtype for its tensor-core P V, as the reference's matmul does.
//! `LANTERN_FUSED=0` turns the fused path off on CUDA.
//!
//! [`picks`] serves speculative drafting rather than the blocks: the drafter's probability rows
//! and the few picks per row a tree builder needs, made on the device (always on, any device).
//! [`place_mask`] and [`move_slots`] serve the fixed-shape (CUDA graph) steps' bookkeeping;
//! [`probe`] holds the kernel bench's read-bandwidth probes.
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_layer;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
mod launch;
mod layer;
pub mod picks;
#[cfg(feature = "cuda")]
mod picks_cuda;
pub mod probe;
mod split_k;
#[cfg(feature = "cuda")]
mod split_k_cuda;

pub use layer::{decode_layer, decode_layer_enabled, decode_layer_fits, BlockWeights, LAYER_ROWS};
pub use split_k::{linear_add_rms_norm, set_split_k, SPLIT_K_MAX_ROWS};

use std::cell::Cell;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp3, Layout, Result,
};
use candle_core::{Shape, Tensor};

thread_local! {
    static FORCE_CPU: Cell<bool> = const { Cell::new(false) };
}

/// Makes inference on the CPU take the fused path on this thread (tests compare it with the
/// reference path; on the CPU the reference ops are faster).
pub fn force_on_cpu(on: bool) {
    FORCE_CPU.with(|f| f.set(on));
}

fn env_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_FUSED").map_or(true, |v| v != "0"))
}

/// Opens CUDA device `ordinal` for lantern. All of lantern's GPU work runs on candle's one
/// stream, so cudarc's cross-stream bookkeeping (an event wait before and an event record after
/// every kernel, per buffer argument) is turned off: it only costs host time per launch.
/// `LANTERN_EVENT_TRACKING=1` keeps it.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        if std::env::var("LANTERN_EVENT_TRACKING").map_or(true, |v| v != "1") {
            // SAFETY: every buffer of this device is created after this call and used on the
            // device's single stream, so stream order alone orders all accesses.
            unsafe { d.disable_event_tracking() };
        }
    }
    Ok(dev)
}

/// Whether inference on `x` takes the fused kernels: no gradient tracking, a float dtype, and
/// CUDA (unless `LANTERN_FUSED=0`) or a CPU thread under [`force_on_cpu`].
pub fn active(x: &Tensor) -> bool {
    if x.track_op() || !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return false;
    }
    match x.device() {
        Device::Cpu => FORCE_CPU.with(|f| f.get()),
        Device::Cuda(_) => env_enabled(),
        _ => false,
    }
}

/// Whether the fused attention serves heads of `hd` on `x`'s device (the CUDA kernels are
/// built for 32, 64 and 128; the CPU version takes any even size).
pub fn supports_head_dim(x: &Tensor, hd: usize) -> bool {
    match x.device() {
        Device::Cuda(_) => matches!(hd, 32 | 64 | 128),
        _ => hd.is_multiple_of(2),
    }
}

/// `rms_norm(x) * weight` (normalised in f32, rounded to the dtype, then scaled), one kernel.
///
/// # Shapes
/// - `x`: `[.., dim]` contiguous; `weight`: `[dim]` → `[.., dim]`
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    aligned(x)?.apply_op2_no_bwd(weight, &Norm { eps })
}

/// `x` contiguous and starting on a 16-byte boundary (the kernels' vector loads), copied if
/// needed.
fn aligned(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
        Ok(x.clone())
    } else {
        x.copy()
    }
}

/// Makes this process's CUDA norms and SiLU-mul take their plain kernels (one 256-thread
/// block per row; one element per thread) instead of the default ones (one warp per row with
/// the row in registers; a 16-byte chunk per thread): tests hold the two to the same bits.
#[cfg(feature = "cuda")]
pub fn set_plain_row_kernels(on: bool) {
    cuda::PLAIN_ROWS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `h = x + residual` (rounded to the dtype) and `rms_norm(h) * weight`, one kernel.
///
/// # Shapes
/// - `x`, `residual`: `[.., dim]`; `weight`: `[dim]` → (`h`, normed), both `[.., dim]`
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let out = aligned(x)?.apply_op3_no_bwd(&aligned(residual)?, weight, &AddNorm { eps })?;
    Ok((out.get(0)?, out.get(1)?))
}

/// `silu(gate) * up` from the fused gate/up projection (`[.., 2f]`, gate first) → `[.., f]`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

/// The elements of a contiguous f32 view on a GPU, copied to the host straight from its element
/// range (no device copy first, no transfer of the rest of its storage); `None` for other
/// tensors (CPU, other dtypes, strided views).
pub fn contiguous_f32_to_host(t: &Tensor) -> Result<Option<Vec<f32>>> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && t.dtype() == DType::F32 {
        return cuda::contiguous_f32_to_host(t);
    }
    let _ = t;
    Ok(None)
}

/// RoPE table rows of `positions` (any integer dtype → u32, same shape): a position at or past
/// `rows` reads `zero_row` (a zero-rotation row). One kernel on CUDA (the tensor ops were a
/// comparison, a fill, an add and a select, and a scalar upload).
pub fn clamp_rows(positions: &Tensor, rows: usize, zero_row: usize) -> Result<Tensor> {
    let pos = positions.to_dtype(DType::U32)?;
    if rows > i32::MAX as usize || zero_row >= rows.max(1) {
        candle_core::bail!("clamp_rows: zero row {zero_row} outside a table of {rows} rows");
    }
    #[cfg(feature = "cuda")]
    if pos.device().is_cuda() {
        return pos.contiguous()?.apply_op1_no_bwd(&ClampRows {
            rows: rows as u32,
            zero: zero_row as u32,
        });
    }
    let past = pos.ge(rows as f64)?;
    let zero = (pos.zeros_like()? + zero_row as f64)?;
    past.where_cond(&zero, &pos)
}

/// See [`clamp_rows`] (CUDA only; elsewhere the tensor ops run).
#[cfg(feature = "cuda")]
struct ClampRows {
    rows: u32,
    zero: u32,
}

#[cfg(feature = "cuda")]
impl CustomOp1 for ClampRows {
    fn name(&self) -> &'static str {
        "lantern-clamp-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = cpu::contiguous(s.as_slice::<u32>()?, l)?;
        let out = p
            .iter()
            .map(|&x| if x >= self.rows { self.zero } else { x })
            .collect();
        Ok((CpuStorage::U32(out), l.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        cuda::clamp_rows(s, l, n, self.rows, self.zero).map(|st| (st, l.shape().clone()))
    }
}

/// `[table[ids] | feats]`: each row's embedding (table `[v, d]`, ids u32, one per row) next to
/// its features `[.., d]` → `[.., 2d]`, in one kernel where the embedding gather and a
/// concatenation of two copies were three (the drafter's fc input). Rows with an id past the
/// table read its last row.
pub fn embed_cat(table: &Tensor, ids: &Tensor, feats: &Tensor) -> Result<Tensor> {
    let (v, d) = table.dims2()?;
    let n = ids.elem_count();
    if ids.dtype() != DType::U32
        || feats.dim(candle_core::D::Minus1)? != d
        || feats.elem_count() != n * d
        || v == 0
    {
        candle_core::bail!(
            "embed_cat: ids {:?} ({:?}) and features {:?} do not fit a table {:?}",
            ids.dims(),
            ids.dtype(),
            feats.dims(),
            table.dims()
        );
    }
    let mut dims = feats.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = 2 * d;
    }
    let out = table.contiguous()?.apply_op3_no_bwd(
        &ids.flatten_all()?.contiguous()?,
        &feats.to_dtype(table.dtype())?.contiguous()?,
        &EmbedCat { n, d, v },
    )?;
    out.reshape(dims)
}

/// See [`embed_cat`].
struct EmbedCat {
    n: usize,
    d: usize,
    v: usize,
}

impl CustomOp3 for EmbedCat {
    fn name(&self) -> &'static str {
        "lantern-embed-cat"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let st = cpu::embed_cat(s1, l1, s2, l2, s3, l3, (self.n, self.d, self.v))?;
        Ok((st, Shape::from((self.n, 2 * self.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let st = cuda::embed_cat(s1, l1, s2, l2, s3, l3, (self.n, self.d, self.v))?;
        Ok((st, Shape::from((self.n, 2 * self.d))))
    }
}

/// `x · wᵀ` of a bias-free projection: candle's matmul ([`candle_nn::Linear`]'s forward), or
/// on CUDA (bf16 or f16, inference) under `LANTERN_GEMM=heuristic|timed` cuBLASLt with the
/// algorithm [`gemm::GemmPolicy`] picks for its shape.
///
/// # Shapes
/// - `x`: `[.., k]`; `lin`: weight `[n, k]` → `[.., n]`
pub fn linear(lin: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(timed) = lt_serves(lin, x)? {
        let x = x.contiguous()?;
        return x.apply_op2_no_bwd(lin.weight(), &LtLinear { timed });
    }
    candle_core::Module::forward(lin, x)
}

/// Whether [`linear`] takes cuBLASLt for `x` (and whether timed); `None`: candle's matmul.
#[cfg(feature = "cuda")]
fn lt_serves(lin: &candle_nn::Linear, x: &Tensor) -> Result<Option<bool>> {
    let w = lin.weight();
    let served = lin.bias().is_none()
        && x.device().is_cuda()
        && active(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && w.dtype() == x.dtype()
        && !w.track_op()
        && w.rank() == 2
        && w.is_contiguous()
        && x.dims().last() == w.dims().get(1);
    if !served {
        return Ok(None);
    }
    Ok(match gemm::gemm_policy()? {
        gemm::GemmPolicy::Cublas => None,
        gemm::GemmPolicy::Heuristic => Some(false),
        gemm::GemmPolicy::Timed => Some(true),
    })
}

/// See [`linear`] (CUDA only).
#[cfg(feature = "cuda")]
struct LtLinear {
    timed: bool,
}

#[cfg(feature = "cuda")]
impl CustomOp2 for LtLinear {
    fn name(&self) -> &'static str {
        "lantern-lt-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("linear: the cuBLASLt path is CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let k = *xl.dims().last().unwrap_or(&0);
        let (n, wk) = wl.shape().dims2()?;
        if wk != k || k == 0 {
            candle_core::bail!(
                "linear: input {:?} and weight {:?} do not fit",
                xl.dims(),
                wl.dims()
            );
        }
        let m = xl.shape().elem_count() / k;
        let out = gemm::linear(x, xl, w, wl, &LinearDims { m, k, n }, self.timed)?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((out, Shape::from(dims)))
    }
}

/// Most rows [`small_linear`] serves (decode steps: batch rows x one token).
pub const SMALL_ROWS: usize = 8;
/// Shared memory [`small_linear`] may use for its f32 copy of the input rows.
const SMALL_SHARED: usize = 96 * 1024;

/// What [`small_linear`] does after the product.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// `y = x wᵀ`.
    None,
    /// `y = residual + x wᵀ` (the product rounded to the dtype first, like two ops).
    Residual(&'a Tensor),
    /// SwiGLU: `w` holds gate rows then up rows; `y = silu(x w_gateᵀ) * x w_upᵀ`.
    SwiGlu,
}

/// Whether [`small_linear`] serves `rows` input rows of width `k` in `dtype` (few rows, `k` a
/// multiple of 8 that a warp's registers hold, the rows' f32 copy within shared memory).
pub fn small_linear_fits(rows: usize, k: usize, dtype: DType) -> bool {
    (1..=SMALL_ROWS).contains(&rows)
        && k.is_multiple_of(8)
        && (rows + 1) * k * 4 <= SMALL_SHARED
        && k <= SMALL_CHUNKS * 32 * 16 / dtype.size_in_bytes()
}

/// 16-byte loads per lane a [`small_linear`] warp keeps in registers (`SMALL_CH` in the kernel).
const SMALL_CHUNKS: usize = 16;

/// `x wᵀ` for a few rows as one weight-streaming kernel, with an optional RMSNorm of `x` first
/// (`norm`: weight and eps, exactly [`rms_norm`]'s numerics) and an [`Epilogue`].
///
/// # Shapes
/// - `x`: `[.., k]` (at most [`SMALL_ROWS`] rows); `w`: `[n, k]` (`[2n, k]` for SwiGLU) →
///   `[.., n]`; a residual is `[.., n]`
pub fn small_linear(
    x: &Tensor,
    w: &Tensor,
    norm: Option<(&Tensor, f32)>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    let x = aligned(x)?;
    let op = SmallLinear {
        dtype: x.dtype(),
        norm: norm.map(|(t, e)| (t.clone(), e)),
        residual: match epilogue {
            Epilogue::Residual(r) => Some(r.contiguous()?),
            _ => None,
        },
        swiglu: matches!(epilogue, Epilogue::SwiGlu),
        kv: None,
    };
    x.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// Whether the new keys and values go into the cache inside a neighbouring kernel instead of
/// [`write_kv`]'s own: a decode step's `wqkv` product ([`small_linear_kv`]; measured 1.7% off
/// a GPT-XL decode step on an H100 on average, docs/BENCHMARKS.md §0000000b) and the
/// tensor-core attention of several tokens per row ([`attention_write_kv`]). On unless
/// `LANTERN_FUSED_KV=0`.
pub fn fused_kv_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_FUSED_KV").map_or(true, |v| v != "0"))
}

/// [`small_linear`] of a fused `wqkv` (with its RMSNorm first) that also does [`write_kv`]'s
/// work for one token per row: the keys rotated with `rope` and the values go into slot `at`
/// of cache layer `layer` of `kv`, from the rounded outputs, so the cache holds what
/// `write_kv` of the returned `qkv` would write. On CUDA one kernel (each warp takes a pair of
/// adjacent rows, so that both halves of a RoPE pair meet in its epilogue); elsewhere, or for
/// more than one token per row, the two ops.
///
/// # Shapes
/// - `x`: `[b, s, dim]`; `w`: `[(h + 2 kvh) hd, dim]` → `qkv` `[b, s, (h + 2 kvh) hd]`
#[allow(clippy::too_many_arguments)]
pub fn small_linear_kv(
    x: &Tensor,
    w: &Tensor,
    norm: Option<(&Tensor, f32)>,
    kv: &Tensor,
    rope: &Tensor,
    layer: usize,
    at: usize,
    heads: Heads,
) -> Result<Tensor> {
    let one_token = x.dims().len() == 3 && x.dim(1)? == 1;
    if !(one_token && x.device().is_cuda() && heads.hd.is_multiple_of(2)) {
        let qkv = small_linear(x, w, norm, Epilogue::None)?;
        write_kv(kv, &qkv, rope, layer, at, heads)?;
        return Ok(qkv);
    }
    let b = x.dim(0)?;
    const OP: &str = "fused wqkv + K/V write";
    let cache = CacheLayer::check(OP, kv.layout(), layer, b, heads, at + 1)?;
    let rope = rope.contiguous()?;
    let rope_rows = rope_rows(rope.dims(), b, 1, heads.hd)?;
    let q = (heads.h + 2 * heads.kvh) * heads.hd;
    if w.dim(0)? != q {
        candle_core::bail!("{OP}: weight {:?} for {q} qkv columns", w.dims());
    }
    let x = aligned(x)?;
    let op = SmallLinear {
        dtype: x.dtype(),
        norm: norm.map(|(t, e)| (t.clone(), e)),
        residual: None,
        swiglu: false,
        kv: Some(FusedKv {
            kv: kv.clone(),
            rope,
            cache,
            at,
            heads,
            rope_rows,
        }),
    };
    x.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// Head layout of a fused `wqkv` output `[b, s, (h + 2 kvh) * hd]`.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads.
    pub h: usize,
    /// K/V heads.
    pub kvh: usize,
    /// Head size.
    pub hd: usize,
}

/// Rotates the keys of `qkv` with the packed RoPE rows `rope` (`[1 or b, s, pairs, 2]` f32,
/// cos then sin) and writes keys and values into cache layer `layer` at slots `at..at + s` of
/// `kv` (`[2, n_layer, b, kvh, max_len, hd]`, see [`crate::cache::KvCache::write_slot`]).
pub fn write_kv(
    kv: &Tensor,
    qkv: &Tensor,
    rope: &Tensor,
    layer: usize,
    at: usize,
    heads: Heads,
) -> Result<()> {
    kv.inplace_op3(
        &qkv.contiguous()?,
        &rope.contiguous()?,
        &KvWrite { layer, at, heads },
    )
}

/// Copies cache slots `from..from + s` to `to..to + s` (not overlapping) in every plane, layer,
/// batch row and head of a cache tensor `[2, n_layer, b, kvh, max_len, hd]`: one pitched copy
/// on CUDA (tensor ops would gather the block of every layer, then copy it back, which is what
/// the CPU does).
pub fn move_slots(kv: &Tensor, from: usize, to: usize, s: usize) -> Result<()> {
    let &[_, _, _, _, max_len, _] = kv.dims() else {
        candle_core::bail!(
            "move_slots: {:?} is not a [2, L, b, kvh, max_len, hd] cache",
            kv.dims()
        );
    };
    if from.max(to) + s > max_len || (from < to + s && to < from + s) {
        candle_core::bail!(
            "move_slots: slots {from}..+{s} -> {to} overlap or leave the cache ({max_len})"
        );
    }
    #[cfg(feature = "cuda")]
    if kv.device().is_cuda() {
        return cuda::move_slots(kv, from, to, s);
    }
    kv.slice_set(&kv.narrow(4, from, s)?.contiguous()?, 4, to)
}

/// Gathers kept cache entries from a block at slot `from` (a deferred staging block, see
/// [`crate::cache::KvCache::commit_staging`]) to `to..to + m`: for batch row r, slot `from +
/// rows[r][i]` -> `to + i` in every plane, layer and head of a cache tensor `[2, n_layer, b,
/// kvh, max_len, hd]` (every list of one length `m`). The source slots must lie at or past `to
/// + m`. One kernel on CUDA that moves only the kept entries.
pub fn gather_slots(kv: &Tensor, rows: &[Vec<usize>], from: usize, to: usize) -> Result<()> {
    let &[_, _, b, _, max_len, _] = kv.dims() else {
        candle_core::bail!(
            "gather_slots: {:?} is not a [2, L, b, kvh, max_len, hd] cache",
            kv.dims()
        );
    };
    let m = rows.first().map_or(0, |r| r.len());
    let top = rows.iter().flatten().copied().max().unwrap_or(0);
    if rows.len() != b
        || rows.iter().any(|r| r.len() != m)
        || from < to + m
        || from + top >= max_len
    {
        candle_core::bail!(
            "gather_slots: {m} entries from slot {from} (+ up to {top}) to {to} for {} of {b} rows overlap, differ in length or leave the cache ({max_len})",
            rows.len()
        );
    }
    if m == 0 {
        return Ok(());
    }
    let idx: Vec<u32> = rows.iter().flatten().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, (b, m), kv.device())?;
    kv.inplace_op2(&idx, &GatherSlots { from, to })
}

/// See [`gather_slots`].
struct GatherSlots {
    from: usize,
    to: usize,
}

impl candle_core::InplaceOp2 for GatherSlots {
    fn name(&self) -> &'static str {
        "lantern-gather-slots"
    }

    fn cpu_fwd(
        &self,
        kv: &mut CpuStorage,
        kl: &Layout,
        idx: &CpuStorage,
        il: &Layout,
    ) -> Result<()> {
        let &[planes, layers, b, kvh, max_len, hd] = kl.dims() else {
            candle_core::bail!("gather_slots: not a cache tensor");
        };
        let (Some((k0, k1)), Some((i0, i1))) = (kl.contiguous_offsets(), il.contiguous_offsets())
        else {
            candle_core::bail!("gather_slots: the cache and the indices must be contiguous");
        };
        let idx = &idx.as_slice::<u32>()?[i0..i1];
        fn go<T: Copy>(kv: &mut [T], idx: &[u32], g: &GatherSlots, dims: [usize; 5]) {
            let [outer, b, kvh, max_len, hd] = dims;
            let m = idx.len() / b.max(1);
            for o in 0..outer * b * kvh {
                let r = (o / kvh) % b;
                let plane = &mut kv[o * max_len * hd..(o + 1) * max_len * hd];
                for i in 0..m {
                    let src = (g.from + idx[r * m + i] as usize) * hd;
                    plane.copy_within(src..src + hd, (g.to + i) * hd);
                }
            }
        }
        let dims = [planes * layers, b, kvh, max_len, hd];
        match kv {
            CpuStorage::F32(v) => go(&mut v[k0..k1], idx, self, dims),
            CpuStorage::BF16(v) => go(&mut v[k0..k1], idx, self, dims),
            CpuStorage::F16(v) => go(&mut v[k0..k1], idx, self, dims),
            CpuStorage::F64(v) => go(&mut v[k0..k1], idx, self, dims),
            _ => candle_core::bail!("gather_slots: a float cache expected"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        kv: &mut candle_core::CudaStorage,
        kl: &Layout,
        idx: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<()> {
        cuda::gather_slots(kv, kl, idx, il, self.from, self.to)
    }
}

/// Writes the additive f32 mask `src` (`[.., len + s]`: `len` filled keys, then a block of
/// `s`) into `dst` (`[.., max_len]`, same leading dims) as a fixed-shape step reads it: the
/// filled keys, `-inf` up to the staging slots `max_len - s..`, then the block's keys. One
/// kernel instead of a fill, a concatenation and a copy. `filled` (a u32 `[1]`, the step's
/// [`KeyMask::Staged`] length) receives `len` in the same kernel.
pub fn place_mask(dst: &Tensor, src: &Tensor, len: usize, filled: Option<&Tensor>) -> Result<()> {
    let (w, max_len) = (
        src.dim(candle_core::D::Minus1)?,
        dst.dim(candle_core::D::Minus1)?,
    );
    let rows = dst.elem_count() / max_len.max(1);
    if w < len || w - len > max_len.saturating_sub(len) || src.elem_count() != rows * w {
        candle_core::bail!(
            "place_mask: mask {:?} with {len} filled keys does not fit {:?}",
            src.dims(),
            dst.dims()
        );
    }
    if let Some(f) = filled {
        check_filled_buffer(f, "place_mask")?;
    }
    let cuda_filled = filled.filter(|f| f.device().is_cuda()).cloned();
    if let Some(f) = filled.filter(|f| !f.device().is_cuda()) {
        f.slice_set(&Tensor::new(&[len as u32], f.device())?, 0, 0)?;
    }
    let op = PlaceMask {
        rows,
        len,
        s: w - len,
        max_len,
        filled: cuda_filled,
    };
    dst.inplace_op2(&src.to_dtype(DType::F32)?.contiguous()?, &op)
}

/// Which keys each query sees.
#[derive(Clone, Debug)]
pub enum KeyMask {
    /// All keys.
    None,
    /// Query `i` sees keys `0..=past + i`.
    Causal { past: usize },
    /// Additive f32 mask `[s, keys]` or `[b, 1, s, keys]`: `-inf` hides a key.
    Additive(Tensor),
    /// [`KeyMask::Additive`] over a fixed-shape step's cache, whose slots `filled..at` are
    /// empty (the mask must hide them): `filled` is a u32 `[1]` on the device holding the
    /// filled length, read when the kernel runs (so a replayed CUDA graph sees each step's),
    /// and the CUDA kernels skip the empty slots (`LANTERN_LIVE_KEYS=0`: they visit every
    /// slot).
    Staged {
        mask: Tensor,
        filled: Tensor,
        at: usize,
    },
}

/// Checks that `f` can hold a fixed-shape step's filled length ([`KeyMask::Staged`]): a
/// contiguous u32 `[1]`; `op` names the caller in the error.
fn check_filled_buffer(f: &Tensor, op: &str) -> Result<()> {
    if f.dims() != [1] || f.dtype() != DType::U32 || !f.is_contiguous() {
        candle_core::bail!(
            "{op}: the filled length buffer {:?} {:?} is not a contiguous u32 [1] (internal error)",
            f.dims(),
            f.dtype()
        );
    }
    Ok(())
}

/// Whether attention over a fixed-shape cache skips its empty slots ([`KeyMask::Staged`]);
/// `LANTERN_LIVE_KEYS=0` turns it off (for A/B runs).
fn live_keys_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_LIVE_KEYS").map_or(true, |v| v != "0"))
}

/// Masked attention of the queries in `qkv` (rotated with `rope` on load) over the first
/// `keys` cache slots of layer `layer` of `kv`, softmax in f32.
///
/// # Shapes
/// - `qkv`: `[b, s, (h + 2 kvh) * hd]`; `rope`: `[1 or b, s, pairs, 2]` → `[b, s, h * hd]`
pub fn attention(
    qkv: &Tensor,
    rope: &Tensor,
    kv: &Tensor,
    layer: usize,
    keys: usize,
    mask: &KeyMask,
    heads: Heads,
) -> Result<Tensor> {
    attend(qkv, rope, kv, layer, keys, mask, heads, None)
}

/// [`write_kv`] of `qkv`'s new keys and values at slots `at..at + s` (which must lie among
/// the `keys` attended slots), then [`attention`]. On CUDA with several tokens per row in
/// bf16/f16 (tree verification, prefill, drafter blocks) one kernel: the attention reads the
/// new positions from `qkv` and one block per key head writes them into the cache (bit for bit
/// what `write_kv` writes); elsewhere, or with `LANTERN_FUSED_KV=0`, the two ops.
#[allow(clippy::too_many_arguments)]
pub fn attention_write_kv(
    qkv: &Tensor,
    rope: &Tensor,
    kv: &Tensor,
    layer: usize,
    at: usize,
    keys: usize,
    mask: &KeyMask,
    heads: Heads,
) -> Result<Tensor> {
    let (qkv, rope) = (qkv.contiguous()?, rope.contiguous()?);
    let s = qkv.dim(1)?;
    if at + s > keys {
        candle_core::bail!(
            "attention with K/V write: new slots {at}..{} lie beyond the {keys} attended keys",
            at + s
        );
    }
    #[cfg(feature = "cuda")]
    if qkv.device().is_cuda()
        && fused_kv_enabled()
        && cuda::tensor_core_attention(
            qkv.dtype(),
            s,
            qkv.layout().start_offset(),
            rope.layout().start_offset(),
        )
    {
        return attend(&qkv, &rope, kv, layer, keys, mask, heads, Some(at));
    }
    write_kv(kv, &qkv, &rope, layer, at, heads)?;
    attend(&qkv, &rope, kv, layer, keys, mask, heads, None)
}

/// [`attention`], optionally writing the new K/V at `write_at` inside the kernel (CUDA,
/// [`cuda::tensor_core_attention`] only).
#[allow(clippy::too_many_arguments)]
fn attend(
    qkv: &Tensor,
    rope: &Tensor,
    kv: &Tensor,
    layer: usize,
    keys: usize,
    mask: &KeyMask,
    heads: Heads,
    write_at: Option<usize>,
) -> Result<Tensor> {
    let (b, s, _) = qkv.dims3()?;
    let (additive, causal_past) = match mask {
        KeyMask::None => (None, None),
        KeyMask::Causal { past } => (None, Some(*past)),
        KeyMask::Additive(m) | KeyMask::Staged { mask: m, .. } => {
            match additive_mask(m, b, s, keys)? {
                Some(mask) => (Some(mask), None),
                None => candle_core::bail!(
                    "attention mask {:?} does not cover {s} queries over {keys} keys",
                    m.dims()
                ),
            }
        }
    };
    #[cfg(debug_assertions)]
    if let KeyMask::Staged { mask, filled, at } = mask {
        if !filled.device().is_cuda() {
            check_empty_slots_hidden(mask, filled, *at)?;
        }
    }
    let live = match mask {
        KeyMask::Staged { filled, at, .. } if live_keys_enabled() => {
            check_filled_buffer(filled, "attention")?;
            if *at > keys {
                candle_core::bail!(
                    "attention: empty slots up to {at} past the {keys} keys (internal error)"
                );
            }
            Some((filled.clone(), *at))
        }
        _ => None,
    };
    let op = Attention {
        rope: rope.contiguous()?,
        kv: kv.clone(),
        layer,
        keys,
        mask: additive,
        causal_past,
        live,
        heads,
        write_at,
    };
    qkv.contiguous()?.apply_op1_no_bwd(&op)
}

/// Debug builds, CPU tensors: the slots a [`KeyMask::Staged`] step's kernels skip
/// (`filled..at`) must be hidden from every query by its mask, or skipping would change the
/// result (the CUDA kernels trust it; the fixed-shape tests run this check on the CPU).
#[cfg(debug_assertions)]
fn check_empty_slots_hidden(mask: &Tensor, filled: &Tensor, at: usize) -> Result<()> {
    let filled = filled.flatten_all()?.to_vec1::<u32>()?[0] as usize;
    let keys = mask.dim(candle_core::D::Minus1)?;
    if filled > at.min(keys) {
        return Ok(());
    }
    let empty = mask
        .narrow(candle_core::D::Minus1, filled, at.min(keys) - filled)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if let Some(v) = empty.iter().find(|&&v| v != f32::NEG_INFINITY) {
        candle_core::bail!(
            "attention: an empty slot in {filled}..{at} is not hidden by the mask ({v}; internal error)"
        );
    }
    Ok(())
}

/// An additive mask as the kernels read it, if its shape (`[s, keys]` or `[b or 1, 1, s, keys]`)
/// covers `s` queries of `b` batch rows over `keys` keys: f32, contiguous, and whether it has
/// one block per batch row.
fn additive_mask(m: &Tensor, b: usize, s: usize, keys: usize) -> Result<Option<(Tensor, bool)>> {
    let dims = m.dims();
    let fits = (dims.len() == 2 && dims == [s, keys])
        || (dims.len() == 4
            && (dims[0] == b || dims[0] == 1)
            && dims[1] == 1
            && dims[2..] == [s, keys]);
    if !fits {
        return Ok(None);
    }
    let per_row = dims.len() == 4 && dims[0] == b && b > 1;
    Ok(Some((m.to_dtype(DType::F32)?.contiguous()?, per_row)))
}

/// One layer of a cache tensor `[2, n_layer, b, kvh, max_len, hd]` (K at 0, V at 1), as the
/// K/V write and attention address it.
#[derive(Clone, Copy, Debug)]
struct CacheLayer {
    n_layer: usize,
    b: usize,
    kvh: usize,
    max_len: usize,
    hd: usize,
    layer: usize,
}

impl CacheLayer {
    /// Checks that the cache tensor `kv` is contiguous, holds `b` rows of `heads` and layer
    /// `layer`, and has `slots` slots; `op` names the caller in the error.
    fn check(
        op: &str,
        kv: &Layout,
        layer: usize,
        b: usize,
        heads: Heads,
        slots: usize,
    ) -> Result<Self> {
        match kv.dims() {
            &[2, n_layer, cb, kvh, max_len, hd]
                if kv.is_contiguous()
                    && (cb, kvh, hd) == (b, heads.kvh, heads.hd)
                    && layer < n_layer
                    && slots <= max_len =>
            {
                Ok(Self {
                    n_layer,
                    b,
                    kvh,
                    max_len,
                    hd,
                    layer,
                })
            }
            d => candle_core::bail!(
                "{op}: cache tensor {d:?} is not a contiguous [2, L, {b}, {}, >= {slots}, {}] with layer {layer}",
                heads.kvh,
                heads.hd
            ),
        }
    }

    /// Element offset of the entry (`plane` 0 = K, 1 = V, batch row, head, slot) of this layer.
    fn offset(&self, plane: usize, bb: usize, kh: usize, pos: usize) -> usize {
        let rows = ((plane * self.n_layer + self.layer) * self.b + bb) * self.kvh + kh;
        (rows * self.max_len + pos) * self.hd
    }
}

impl Heads {
    /// Checks a `wqkv` output layout `[b, s, (h + 2 kvh) hd]` (contiguous) and returns `(b, s)`.
    fn rows(&self, op: &str, qkv: &Layout) -> Result<(usize, usize)> {
        let Heads { h, kvh, hd } = *self;
        let (b, s, w) = qkv.shape().dims3()?;
        if w != (h + 2 * kvh) * hd || !qkv.is_contiguous() {
            candle_core::bail!(
                "{op}: qkv {:?} does not hold {h}+2x{kvh} heads of {hd}",
                qkv.dims()
            );
        }
        Ok((b, s))
    }
}

struct Norm {
    eps: f32,
}

/// Output `[2, ..]`: the sum, then its norm.
struct AddNorm {
    eps: f32,
}

struct SiluMul;

struct SmallLinear {
    dtype: DType,
    norm: Option<(Tensor, f32)>,
    residual: Option<Tensor>,
    swiglu: bool,
    /// The K/V write fused into the epilogue ([`small_linear_kv`]; CUDA only). Its kernel
    /// gives each warp two adjacent weight rows (row pairs for plain products measured no
    /// faster, docs/BENCHMARKS.md §0000000b).
    kv: Option<FusedKv>,
}

/// Where [`small_linear_kv`]'s epilogue writes keys and values.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FusedKv {
    kv: Tensor,
    rope: Tensor,
    cache: CacheLayer,
    at: usize,
    heads: Heads,
    rope_rows: usize,
}

/// Sizes of one [`small_linear`] call.
#[derive(Clone, Copy, Debug)]
struct LinearDims {
    m: usize,
    k: usize,
    /// Output columns (gate rows for SwiGLU).
    n: usize,
}

impl SmallLinear {
    fn dims(&self, x: &Layout, w: &Layout) -> Result<(LinearDims, Shape)> {
        let k = *x.dims().last().unwrap_or(&0);
        let m = x.shape().elem_count() / k.max(1);
        let (wn, wk) = w.shape().dims2()?;
        let n = if self.swiglu { wn / 2 } else { wn };
        if wk != k || (self.swiglu && wn % 2 != 0) || !small_linear_fits(m, k, self.dtype) {
            candle_core::bail!(
                "small_linear: input {:?} and weight {:?} do not fit (at most {SMALL_ROWS} rows, width a multiple of 8)",
                x.dims(),
                w.dims()
            );
        }
        if let Some((nw, _)) = &self.norm {
            if nw.dims() != [k] {
                candle_core::bail!("small_linear: norm weight {:?} for rows of {k}", nw.dims());
            }
        }
        let mut out = x.dims().to_vec();
        *out.last_mut().expect("rank >= 1") = n;
        if let Some(r) = &self.residual {
            if r.dims() != out.as_slice() {
                candle_core::bail!("small_linear: residual {:?} for output {out:?}", r.dims());
            }
        }
        Ok((LinearDims { m, k, n }, Shape::from(out)))
    }
}

impl CustomOp2 for SmallLinear {
    fn name(&self) -> &'static str {
        "lantern-small-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = self.dims(xl, wl)?;
        if self.kv.is_some() {
            candle_core::bail!("small_linear: the fused K/V write is CUDA only");
        }
        let out = cpu::small_linear(self, &d, x, xl, w, wl)?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, shape) = self.dims(xl, wl)?;
        let out = cuda::small_linear(self, &d, x, xl, w, wl)?;
        Ok((out, shape))
    }
}

struct KvWrite {
    layer: usize,
    at: usize,
    heads: Heads,
}

struct Attention {
    rope: Tensor,
    kv: Tensor,
    layer: usize,
    keys: usize,
    /// The mask and whether it has one block per batch row.
    mask: Option<(Tensor, bool)>,
    causal_past: Option<usize>,
    /// The device's filled length and the staging slot of a fixed-shape step whose empty
    /// slots the CUDA kernels skip ([`KeyMask::Staged`]); the CPU visits every slot.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    live: Option<(Tensor, usize)>,
    heads: Heads,
    /// The slot the kernel writes the new keys and values to (CUDA tensor-core kernel only;
    /// [`attention_write_kv`] checks that the new slots lie among the keys).
    write_at: Option<usize>,
}

/// Sizes of one fused attention call, shared by the CPU and CUDA versions.
#[derive(Clone, Copy, Debug)]
struct AttnDims {
    s: usize,
    h: usize,
    cache: CacheLayer,
    keys: usize,
    /// Batch rows of the RoPE table (1 = shared by all rows).
    rope_rows: usize,
    /// Element strides of the mask between batch rows (0 = shared) and between queries.
    mask_b: usize,
    mask_s: usize,
    causal_past: Option<usize>,
    /// Slot of the new keys and values the kernel also writes (see [`attention_write_kv`]).
    write_at: Option<usize>,
}

impl Attention {
    fn dims(&self, qkv: &Layout) -> Result<AttnDims> {
        const OP: &str = "fused attention";
        let (b, s) = self.heads.rows(OP, qkv)?;
        let cache = CacheLayer::check(OP, self.kv.layout(), self.layer, b, self.heads, self.keys)?;
        let (mask_b, mask_s) = match &self.mask {
            Some((_, batched)) => (if *batched { s * self.keys } else { 0 }, self.keys),
            None => (0, 0),
        };
        Ok(AttnDims {
            s,
            h: self.heads.h,
            cache,
            keys: self.keys,
            rope_rows: rope_rows(self.rope.dims(), b, s, self.heads.hd)?,
            mask_b,
            mask_s,
            causal_past: self.causal_past,
            write_at: self.write_at,
        })
    }
}

/// Checks a packed RoPE table `[1 or b, s, pairs, 2]` and returns its batch rows.
fn rope_rows(dims: &[usize], b: usize, s: usize, hd: usize) -> Result<usize> {
    match dims {
        &[r, rs, p, 2] if (r == 1 || r == b) && rs == s && p * 2 == hd => Ok(r),
        d => candle_core::bail!(
            "packed RoPE rows {d:?} do not fit [1 or {b}, {s}, {}, 2]",
            hd / 2
        ),
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "lantern-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::norm(self.eps, s1, l1, None, s2, l2).map(|s| (s, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::norm(self.eps, s1, l1, None, s2, l2).map(|s| (s, l1.shape().clone()))
    }
}

fn stacked(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

impl CustomOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "lantern-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::norm(self.eps, s1, l1, Some((s2, l2)), s3, l3).map(|s| (s, stacked(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::norm(self.eps, s1, l1, Some((s2, l2)), s3, l3).map(|s| (s, stacked(l1)))
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "lantern-silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = half_last(l)?;
        cpu::silu_mul(s, l).map(|st| (st, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = half_last(l)?;
        cuda::silu_mul(s, l).map(|st| (st, shape))
    }
}

fn half_last(l: &Layout) -> Result<Shape> {
    let mut dims = l.dims().to_vec();
    match dims.last_mut() {
        Some(d) if *d % 2 == 0 && l.is_contiguous() => *d /= 2,
        _ => candle_core::bail!(
            "silu_mul needs a contiguous [.., 2f] input, got {:?}",
            l.dims()
        ),
    }
    Ok(Shape::from(dims))
}

/// Sizes of one K/V write, shared by the CPU and CUDA versions.
#[derive(Clone, Copy, Debug)]
struct WriteDims {
    s: usize,
    h: usize,
    cache: CacheLayer,
    at: usize,
    rope_rows: usize,
}

impl KvWrite {
    fn dims(&self, kv: &Layout, qkv: &Layout, rope: &Layout) -> Result<WriteDims> {
        const OP: &str = "fused K/V write";
        let (b, s) = self.heads.rows(OP, qkv)?;
        let cache = CacheLayer::check(OP, kv, self.layer, b, self.heads, self.at + s)?;
        Ok(WriteDims {
            s,
            h: self.heads.h,
            cache,
            at: self.at,
            rope_rows: rope_rows(rope.dims(), b, s, self.heads.hd)?,
        })
    }
}

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "lantern-kv-write"
    }

    fn cpu_fwd(
        &self,
        kv: &mut CpuStorage,
        kv_l: &Layout,
        qkv: &CpuStorage,
        qkv_l: &Layout,
        rope: &CpuStorage,
        rope_l: &Layout,
    ) -> Result<()> {
        let d = self.dims(kv_l, qkv_l, rope_l)?;
        cpu::write_kv(&d, kv, kv_l, qkv, qkv_l, rope, rope_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        kv: &mut candle_core::CudaStorage,
        kv_l: &Layout,
        qkv: &candle_core::CudaStorage,
        qkv_l: &Layout,
        rope: &candle_core::CudaStorage,
        rope_l: &Layout,
    ) -> Result<()> {
        let d = self.dims(kv_l, qkv_l, rope_l)?;
        cuda::write_kv(&d, kv, kv_l, qkv, qkv_l, rope, rope_l)
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "lantern-attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l)?;
        if d.write_at.is_some() {
            candle_core::bail!("fused attention: the K/V write inside attention is CUDA-only");
        }
        let out = cpu::attention(
            &d,
            qkv,
            l,
            &self.rope,
            &self.kv,
            self.mask.as_ref().map(|m| &m.0),
        )?;
        Ok((out, Shape::from((d.cache.b, d.s, d.h * d.cache.hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dims(l)?;
        let out = cuda::attention(
            &d,
            qkv,
            l,
            &self.rope,
            &self.kv,
            self.mask.as_ref().map(|m| &m.0),
            self.live.as_ref().map(|(t, at)| (t, *at)),
        )?;
        Ok((out, Shape::from((d.cache.b, d.s, d.h * d.cache.hd))))
    }
}

/// See [`place_mask`].
#[derive(Clone)]
struct PlaceMask {
    /// Mask rows (the CPU version walks the slices instead).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rows: usize,
    len: usize,
    s: usize,
    max_len: usize,
    /// A CUDA u32 `[1]` the kernel writes `len` to ([`place_mask`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    filled: Option<Tensor>,
}

impl candle_core::InplaceOp2 for PlaceMask {
    fn name(&self) -> &'static str {
        "lantern-place-mask"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<()> {
        let (CpuStorage::F32(d), CpuStorage::F32(s)) = (d, s) else {
            candle_core::bail!("place_mask: f32 masks only");
        };
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("place_mask: masks must be contiguous");
        };
        let (d, s) = (&mut d[d0..d1], &s[s0..s1]);
        let (len, w, at) = (self.len, self.len + self.s, self.max_len - self.s);
        for (dr, sr) in d.chunks_mut(self.max_len).zip(s.chunks(w)) {
            dr[..len].copy_from_slice(&sr[..len]);
            dr[len..at].fill(f32::NEG_INFINITY);
            dr[at..].copy_from_slice(&sr[len..]);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        d: &mut candle_core::CudaStorage,
        dl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        cuda::place_mask(self, d, dl, s, sl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_rows_sends_positions_past_the_table_to_the_zero_row() -> Result<()> {
        let pos = Tensor::new(&[[0u32, 4, 5, 9], [3, 6, 5, 1]], &Device::Cpu)?;
        let got = clamp_rows(&pos, 5, 2)?.to_vec2::<u32>()?;
        assert_eq!(got, [[0, 4, 2, 2], [3, 2, 2, 1]]);
        assert!(clamp_rows(&pos, 5, 5).is_err());
        Ok(())
    }

    #[test]
    fn place_mask_puts_filled_keys_first_and_the_block_at_the_staging_slots() -> Result<()> {
        let dev = Device::Cpu;
        // 2 rows, 3 filled keys, a block of 2, 8 slots: staging at 6
        let src = Tensor::arange(0f32, 10.0, &dev)?.reshape((2, 5))?;
        let dst = Tensor::zeros((2, 8), DType::F32, &dev)?;
        let filled = Tensor::zeros(1, DType::U32, &dev)?;
        place_mask(&dst, &src, 3, Some(&filled))?;
        assert_eq!(filled.to_vec1::<u32>()?, [3]);
        let ninf = f32::NEG_INFINITY;
        assert_eq!(
            dst.to_vec2::<f32>()?,
            [
                [0.0, 1.0, 2.0, ninf, ninf, ninf, 3.0, 4.0],
                [5.0, 6.0, 7.0, ninf, ninf, ninf, 8.0, 9.0]
            ]
        );
        // a block longer than the room left is refused
        assert!(place_mask(&dst, &Tensor::zeros((2, 9), DType::F32, &dev)?, 3, None).is_err());
        Ok(())
    }

    /// Kept entries gathered from a deferred block equal the tensor ops' gather, on the CPU
    /// (any dtype) and, with CUDA, bit for bit on the GPU (bf16 and f32, GPT-XL's head size).
    #[test]
    fn cuda_gather_slots_equals_the_tensor_gather() -> Result<()> {
        #[cfg(not(feature = "cuda"))]
        let devs = [Device::Cpu];
        #[cfg(feature = "cuda")]
        let devs = [Device::Cpu, Device::new_cuda(0)?];
        for dev in &devs {
            for dtype in [DType::F32, DType::BF16] {
                let (b, max_len, hd) = (3, 40, 64);
                let kv = Tensor::randn(0f32, 1.0, (2, 3, b, 2, max_len, hd), &Device::Cpu)?
                    .to_dtype(dtype)?;
                let rows: Vec<Vec<usize>> =
                    vec![vec![0, 7, 3, 12], vec![0, 1, 2, 3], vec![0, 15, 9, 9]];
                let (from, to) = (20, 6);
                // the reference: gather the block with tensor ops, write it at `to`
                let flat: Vec<u32> = rows.iter().flatten().map(|&r| r as u32).collect();
                let ix = Tensor::from_vec(flat, (b, 4), &Device::Cpu)?
                    .reshape((1, 1, b, 1, 4, 1))?
                    .broadcast_as((2, 3, b, 2, 4, hd))?
                    .contiguous()?;
                let want = kv.copy()?;
                let kept = want
                    .narrow(4, from, max_len - from)?
                    .contiguous()?
                    .gather(&ix, 4)?;
                want.slice_set(&kept, 4, to)?;
                let got = kv.to_device(dev)?;
                gather_slots(&got, &rows, from, to)?;
                let (w, g) = (
                    want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                    got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                );
                assert!(w == g, "{dev:?} {dtype:?}");
                // overlapping source and destination are refused
                assert!(gather_slots(&got, &[vec![0, 1], vec![0, 1], vec![0, 1]], 7, 6).is_err());
            }
        }
        Ok(())
    }
}
