//! Launches of the kernels in `kernels.cu` (PTX built by build.rs) on candle's CUDA stream.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

use super::launch::Launch;
use super::{AttnDims, LinearDims, PlaceMask, SmallLinear, WriteDims, SMALL_SHARED};

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
pub(super) const MODULE: &str = "lantern_fused";
/// Shared memory a block may use without opting in to more.
const SHARED_MAX: usize = 48 * 1024;

pub(super) fn suffix(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("fused kernels: unsupported dtype {d:?}"),
    })
}

pub(super) fn offsets(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("fused op: {:?} not contiguous", l.dims())))
}

pub(super) fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// Runs `$body` with type alias `$t` for the storage's float dtype.
macro_rules! typed {
    ($dt:expr, $t:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            d => bail!("fused kernels: unsupported dtype {d:?}"),
        }
    };
}
pub(super) use typed;

pub(super) fn launch_cfg(grid: (u32, u32, u32), block: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// Set by [`super::set_plain_row_kernels`].
pub(super) static PLAIN_ROWS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn plain_rows() -> bool {
    PLAIN_ROWS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(super) fn norm(
    eps: f32,
    x: &CudaStorage,
    xl: &Layout,
    residual: Option<(&CudaStorage, &Layout)>,
    w: &CudaStorage,
    wl: &Layout,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let dt = x.dtype();
    let cols = *xl.dims().last().unwrap_or(&1);
    let n = xl.shape().elem_count();
    let rows = n / cols.max(1);
    if cols * 4 > SHARED_MAX {
        bail!("fused norm: rows of {cols} are too long");
    }
    // one warp per row with the row in registers where add_rms_norm's vector path applies
    // (16-byte aligned rows of at most 256 chunks; the same bits, see the kernel)
    let vec = 16 / dt.size_in_bytes();
    let aligned = |l: &Layout| offsets(l).is_ok_and(|(a, _)| a.is_multiple_of(vec));
    let warp = !plain_rows()
        && cols.is_multiple_of(vec)
        && cols / vec <= 256
        && aligned(xl)
        && aligned(wl)
        && residual.is_none_or(|(_, rl)| aligned(rl));
    let name = if warp { "rms_norm_warp" } else { "rms_norm" };
    let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(dt)?), MODULE, PTX)?;
    typed!(dt, T => {
        let (a, b) = offsets(xl)?;
        let xs = x.as_cuda_slice::<T>()?.slice(a..b);
        let (a, b) = offsets(wl)?;
        let ws = w.as_cuda_slice::<T>()?.slice(a..b);
        let out_len = if residual.is_some() { 2 * n } else { n };
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        const WARP_ROWS: usize = 2;
        let cfg = if warp {
            launch_cfg((rows.div_ceil(WARP_ROWS) as u32, 1, 1), 32 * WARP_ROWS as u32, 0)
        } else {
            launch_cfg((rows as u32, 1, 1), 256, cols * 4)
        };
        let (rows, cols) = (rows as i32, cols as i32);
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        let rs = match residual {
            Some((r, rl)) => {
                let (a, b) = offsets(rl)?;
                Some(r.as_cuda_slice::<T>()?.slice(a..b))
            }
            None => None,
        };
        builder.arg(&xs);
        builder.arg(&rs);
        builder.arg(&ws);
        builder.arg(&out);
        builder.arg(&rows);
        builder.arg(&cols);
        builder.arg(&eps);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { builder.launch(cfg) }?;
        Ok(wrap(out, &dev))
    })
}

pub(super) fn silu_mul(gu: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = gu.device().clone();
    let dt = gu.dtype();
    let two_f = *l.dims().last().unwrap_or(&0);
    let f = two_f / 2;
    let rows = l.shape().elem_count() / two_f.max(1);
    // a 16-byte chunk of gate and of up per thread where rows allow it (the same bits)
    let vec = 16 / dt.size_in_bytes();
    let chunked = !plain_rows()
        && f.is_multiple_of(vec)
        && offsets(l).is_ok_and(|(a, _)| a.is_multiple_of(vec))
        && rows * f / vec < i32::MAX as usize;
    let name = format!(
        "silu_mul_{}{}",
        suffix(dt)?,
        if chunked { "_vec" } else { "" }
    );
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    typed!(dt, T => {
        let (a, b) = offsets(l)?;
        let src = gu.as_cuda_slice::<T>()?.slice(a..b);
        let n = rows * f;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let per_thread = if chunked { vec } else { 1 };
        let blocks = n.div_ceil(256 * per_thread).clamp(1, 2048) as u32;
        let (rows, f) = (rows as i32, f as i32);
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(&src);
        builder.arg(&out);
        builder.arg(&rows);
        builder.arg(&f);
        // SAFETY: argument list matches the kernel's signature.
        unsafe { builder.launch(launch_cfg((blocks, 1, 1), 256, 0)) }?;
        Ok(wrap(out, &dev))
    })
}

/// See [`super::embed_cat`]: `n` ids, rows of `d`, a table of `v` rows.
pub(super) fn embed_cat(
    table: &CudaStorage,
    tl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    feats: &CudaStorage,
    fl: &Layout,
    (n, d, v): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = table.device().clone();
    let dt = table.dtype();
    let func = dev.get_or_load_custom_func(&format!("embed_cat_{}", suffix(dt)?), MODULE, PTX)?;
    typed!(dt, T => {
        let (a, b) = offsets(tl)?;
        let tab = table.as_cuda_slice::<T>()?.slice(a..b);
        let (a, b) = offsets(il)?;
        let idx = ids.as_cuda_slice::<u32>()?.slice(a..b);
        let (a, b) = offsets(fl)?;
        let fe = feats.as_cuda_slice::<T>()?.slice(a..b);
        let total = n * 2 * d;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(total)? };
        let blocks = total.div_ceil(256).clamp(1, 2048) as u32;
        let (n, d, v) = (n as i32, d as i32, v as i32);
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(&tab);
        builder.arg(&idx);
        builder.arg(&fe);
        builder.arg(&out);
        builder.arg(&n);
        builder.arg(&d);
        builder.arg(&v);
        // SAFETY: argument list matches embed_cat's signature; the views cover v x d, n and
        // n x d elements (checked by the caller).
        unsafe { builder.launch(launch_cfg((blocks, 1, 1), 256, 0)) }?;
        Ok(wrap(out, &dev))
    })
}

pub(super) fn write_kv(
    d: &WriteDims,
    kv: &mut CudaStorage,
    kv_l: &Layout,
    qkv: &CudaStorage,
    qkv_l: &Layout,
    rope: &CudaStorage,
    rope_l: &Layout,
) -> Result<()> {
    let dev = kv.device().clone();
    let dt = kv.dtype();
    if qkv.dtype() != dt {
        bail!("fused K/V write: qkv {:?} vs cache {dt:?}", qkv.dtype());
    }
    let func = dev.get_or_load_custom_func(&format!("write_kv_{}", suffix(dt)?), MODULE, PTX)?;
    let (ra, rb) = offsets(rope_l)?;
    let rope = rope.as_cuda_slice::<f32>()?.slice(ra..rb);
    let base = kv_l.start_offset() as u64;
    let threads = (d.cache.kvh * d.cache.hd / 2)
        .next_multiple_of(32)
        .min(1024) as u32;
    let cfg = launch_cfg((d.s as u32, d.cache.b as u32, 1), threads, 0);
    let ints = [
        d.cache.b,
        d.s,
        d.h,
        d.cache.kvh,
        d.cache.hd,
        d.cache.layer,
        d.cache.n_layer,
        d.cache.max_len,
        d.at,
        d.rope_rows,
    ]
    .map(|v| v as i32);
    typed!(dt, T => {
        let (a, b) = offsets(qkv_l)?;
        let qkv = qkv.as_cuda_slice::<T>()?.slice(a..b);
        let kv = kv.as_cuda_slice_mut::<T>()?;
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(kv);
        builder.arg(&base);
        builder.arg(&qkv);
        builder.arg(&rope);
        for v in &ints {
            builder.arg(v);
        }
        // SAFETY: argument list matches the kernel's signature; dims were checked against
        // the cache's layout.
        unsafe { builder.launch(cfg) }?;
        Ok(())
    })
}

/// Lets `func` use more than 48 KB of dynamic shared memory and asks for `carveout` percent of
/// the SM's L1 as shared memory (100: the most, so that several such blocks stay resident),
/// once per kernel and device (each [`CudaDevice`] loads its own copy of the module: a second
/// device in one process, as in parallel tests, needs the attributes again).
pub(super) fn allow_shared(
    dev: &CudaDevice,
    func: &CudaFunction,
    name: &str,
    max: usize,
    carveout: i32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
    use std::collections::{HashMap, HashSet};
    use std::sync::{Mutex, OnceLock};
    // device -> kernel names (looked up by &str: no allocation per launch)
    static DONE: OnceLock<Mutex<HashMap<DeviceId, HashSet<String>>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let seen = done
        .lock()
        .expect("not poisoned")
        .get(&dev.id())
        .is_some_and(|names| names.contains(name));
    if seen {
        return Ok(());
    }
    func.set_attribute(
        Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        max as i32,
    )
    .w()?;
    func.set_attribute(
        Attr::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        carveout,
    )
    .w()?;
    done.lock()
        .expect("not poisoned")
        .entry(dev.id())
        .or_default()
        .insert(name.to_string());
    Ok(())
}

/// Blocks of `func` (with `threads` threads and `shared` bytes) resident on the whole device
/// at once, cached per kernel and shared size.
pub(super) fn resident_blocks(
    dev: &CudaDevice,
    func: &CudaFunction,
    name: &str,
    threads: u32,
    shared: usize,
) -> Result<usize> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    // kernel name -> shared bytes -> blocks (looked up by &str: no allocation per launch)
    static CACHE: OnceLock<Mutex<HashMap<String, HashMap<usize, usize>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let hit = cache
        .lock()
        .expect("not poisoned")
        .get(name)
        .and_then(|m| m.get(&shared).copied());
    if let Some(n) = hit {
        return Ok(n);
    }
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)
        .w()?;
    let n = (per_sm.max(1) as usize) * sm_count(dev)?;
    cache
        .lock()
        .expect("not poisoned")
        .entry(name.to_string())
        .or_default()
        .insert(shared, n);
    Ok(n)
}

/// Multiprocessors of `dev` (at least 1).
pub(super) fn sm_count(dev: &CudaDevice) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as Attr;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(sms.max(1) as usize)
}

/// The contiguous view (layout `l`) of a tensor held by an op, see [`held`].
pub(super) fn held_view<'a, T: CudaDType>(
    g: &'a Storage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let (a, b) = offsets(l)?;
    Ok(held::<T>(g, what)?.slice(a..b))
}

/// [`held_view`] of an optional tensor held by an op (its storage guard and layout).
pub(super) fn held_view_opt<'a, T: CudaDType, G: std::ops::Deref<Target = Storage>>(
    g: &'a Option<(G, &Layout)>,
    what: &str,
) -> Result<Option<CudaView<'a, T>>> {
    g.as_ref()
        .map(|(g, l)| held_view::<T>(g, l, what))
        .transpose()
}

/// The typed CUDA slice of a tensor held by an op (not one of its inputs).
pub(super) fn held<'a, T: CudaDType>(g: &'a Storage, what: &str) -> Result<&'a CudaSlice<T>> {
    match g {
        Storage::Cuda(c) => c.as_cuda_slice::<T>(),
        _ => bail!("fused attention: {what} is not on the GPU"),
    }
}

/// Shared memory the attention kernel may opt in to.
const ATTN_SHARED_MAX: usize = 160 * 1024;

/// Threads of the one-query attention kernel's block.
const ONE_QUERY_THREADS: usize = 1024;

/// Queries per block and threads: the largest tile whose shared memory fits (one query: a
/// block of 1024 threads, so that a decode step's few blocks still keep many loads in flight).
fn tile(d: &AttnDims) -> Option<(usize, u32, usize)> {
    let tiles: &[usize] = if d.s == 1 { &[1] } else { &[8, 4, 1] };
    tiles.iter().find_map(|&qt| {
        let threads = if d.s == 1 { ONE_QUERY_THREADS } else { 128 };
        let warps = threads / 32;
        let shared = 4 * (qt * d.keys + qt * d.cache.hd + warps * qt * d.cache.hd);
        (shared <= ATTN_SHARED_MAX).then_some((qt, threads as u32, shared))
    })
}

pub(super) fn attention(
    d: &AttnDims,
    qkv: &CudaStorage,
    qkv_l: &Layout,
    rope: &Tensor,
    kv: &Tensor,
    mask: Option<&Tensor>,
    live: Option<(&Tensor, usize)>,
) -> Result<CudaStorage> {
    let dev = qkv.device().clone();
    let dt = qkv.dtype();
    if kv.dtype() != dt {
        bail!("fused attention: qkv {dt:?} vs cache {:?}", kv.dtype());
    }
    if live.is_some() && mask.is_none() {
        bail!("fused attention: skipping empty slots needs the mask that hides them");
    }
    let (qa, qb) = offsets(qkv_l)?;
    let ra = offsets(rope.layout())?.0;
    let tc = tensor_core_attention(dt, d.s, qa, ra);
    // the instance that skips a fixed-shape step's empty slots, where skipping can save work:
    // the one-query kernel's block has a thread per key up to ONE_QUERY_THREADS, so below that
    // it visits every slot in one pass either way (and the plain instance measured ~1% faster
    // on a decode step, docs/BENCHMARKS.md §00000011)
    let live = live.filter(|_| tc || d.s > 1 || d.keys > ONE_QUERY_THREADS);
    let live_name = if live.is_some() { "_live" } else { "" };
    if d.write_at.is_some() && !tc {
        bail!("fused attention: only the tensor-core kernel writes the new keys and values");
    }
    let (name, grid, threads, shared) = if tc {
        let warps = tc_warps(d);
        let name = format!(
            "attention_tc_{}_{warps}_{}{live_name}",
            d.cache.hd,
            suffix(dt)?
        );
        let grid = (d.s.div_ceil(16) as u32, d.h as u32, d.cache.b as u32);
        let shared = 4 * warps * 16 * (d.cache.hd + 2);
        (name, grid, 32 * warps as u32, shared)
    } else {
        let Some((qt, threads, shared)) = tile(d) else {
            bail!(
                "fused attention: {} keys do not fit the kernel's shared memory; set LANTERN_FUSED=0",
                d.keys
            );
        };
        let name = format!("attention_{}_{qt}_{}{live_name}", d.cache.hd, suffix(dt)?);
        let grid = (d.s.div_ceil(qt) as u32, d.h as u32, d.cache.b as u32);
        (name, grid, threads, shared)
    };
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    // the key-split kernel needs little shared memory: half the carve-out leaves L1 for loads
    allow_shared(
        &dev,
        &func,
        &name,
        ATTN_SHARED_MAX,
        if tc { 50 } else { 100 },
    )?;
    let (rope_g, rope_l) = rope.storage_and_layout();
    let rope_s = held_view::<f32>(&rope_g, rope_l, "the RoPE table")?;
    let (kv_g, kv_l) = kv.storage_and_layout();
    let base = kv_l.start_offset() as u64;
    let mask_g = mask.map(|m| m.storage_and_layout());
    let live_g = live.map(|(t, _)| t.storage_and_layout());
    let live_at = live.map_or(0, |(_, at)| at as i32);
    let cfg = launch_cfg(grid, threads, shared);
    let ints = [
        d.cache.b,
        d.s,
        d.h,
        d.cache.kvh,
        d.cache.layer,
        d.cache.n_layer,
        d.cache.max_len,
        d.keys,
        d.rope_rows,
    ]
    .map(|v| v as i32);
    let strides = [d.mask_b as i64, d.mask_s as i64];
    let causal = d.causal_past.map_or(-1, |p| p as i32);
    let write_at = d.write_at.map_or(-1, |a| a as i32);
    typed!(dt, T => {
        if !(base as usize * std::mem::size_of::<T>()).is_multiple_of(16) {
            bail!("fused attention: the cache view is not 16-byte aligned");
        }
        let q = qkv.as_cuda_slice::<T>()?.slice(qa..qb);
        let kv_s = held::<T>(&kv_g, "the KV cache")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(d.cache.b * d.s * d.h * d.cache.hd)? };
        let mask_s = held_view_opt::<f32, _>(&mask_g, "the mask")?;
        let live_s = held_view_opt::<u32, _>(&live_g, "the filled length")?;
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(&q);
        builder.arg(&rope_s);
        builder.arg(kv_s);
        builder.arg(&base);
        builder.arg(&mask_s);
        builder.arg(&out);
        for v in &ints {
            builder.arg(v);
        }
        builder.arg(&strides[0]);
        builder.arg(&strides[1]);
        builder.arg(&causal);
        if tc {
            builder.arg(&write_at);
        }
        builder.arg(&live_s);
        builder.arg(&live_at);
        // SAFETY: argument list matches the kernel's signature; dims were checked against
        // the cache's layout (with `write_at`, the kernel writes slots `write_at..+s` of the
        // cache, which no other block of the launch reads: they read those rows from qkv).
        unsafe { builder.launch(cfg) }?;
        Ok(wrap(out, &dev))
    })
}

/// Whether the attention of `s` queries per row in `dt` (qkv starting at element `qkv_start`,
/// the RoPE table at `rope_start`) runs the key-split tensor-core kernel: bf16/f16 with many
/// queries (16 per block; its 16-byte query loads and float4 RoPE loads need aligned starts);
/// one query takes the one-query kernel unless `LANTERN_ATTN_KERNEL=tc`. Only this kernel can
/// also write the new keys and values ([`super::attention_write_kv`]).
pub(super) fn tensor_core_attention(
    dt: DType,
    s: usize,
    qkv_start: usize,
    rope_start: usize,
) -> bool {
    dt != DType::F32
        && (s > 1 || key_split_decode())
        && (qkv_start * dt.size_in_bytes()).is_multiple_of(16)
        && rope_start.is_multiple_of(4)
}

/// `LANTERN_ATTN_KERNEL=tc`: decode steps (one query) in bf16/f16 also take the key-split
/// tensor-core kernel (a kernel-bench diagnostic: the one-query kernel measured 0.2-0.5 µs
/// faster at GPT-XL shapes, docs/BENCHMARKS.md).
fn key_split_decode() -> bool {
    static K: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *K.get_or_init(|| std::env::var("LANTERN_ATTN_KERNEL").is_ok_and(|v| v == "tc"))
}

/// The number in environment variable `name` (bench switches), if it is set and parses.
pub(super) fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Warps of the key-split attention: 16 for a one-query step (few blocks, so more warps share
/// the keys), 8 otherwise (head size 128: at most 8, its registers); `LANTERN_ATTN_WARPS`
/// (4, 8 or 16) overrides it for the kernel bench.
fn tc_warps(d: &AttnDims) -> usize {
    static W: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced =
        *W.get_or_init(|| env_number("LANTERN_ATTN_WARPS").filter(|w| [4, 8, 16].contains(w)));
    let w = forced.unwrap_or(if d.s == 1 { 16 } else { 8 });
    if d.cache.hd > 64 {
        w.min(8)
    } else {
        w
    }
}

/// Warps per block of the few-row linear kernels for `n` output rows: 8 for wide outputs
/// (GPT-XL's wqkv and gate/up rows), 4 otherwise, as measured on an H100 (docs/BENCHMARKS.md
/// §0000); `LANTERN_SMALL_WARPS` (1 to 32) overrides it, a diagnostic for the kernel bench.
fn small_warps(n: usize) -> usize {
    static W: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced =
        *W.get_or_init(|| env_number("LANTERN_SMALL_WARPS").filter(|w| (1..=32).contains(w)));
    forced.unwrap_or(if n >= 2048 { 8 } else { 4 })
}

pub(super) fn small_linear(
    op: &SmallLinear,
    d: &LinearDims,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
) -> Result<CudaStorage> {
    let (norm, residual, swiglu) = (op.norm.as_ref(), op.residual.as_ref(), op.swiglu);
    let dev = x.device().clone();
    let dt = x.dtype();
    if w.dtype() != dt {
        bail!("small_linear: input {dt:?} vs weight {:?}", w.dtype());
    }
    // the fused K/V write's kernel takes weight rows in pairs (both halves of a RoPE pair)
    let pairs = op.kv.is_some();
    if pairs && (swiglu || residual.is_some() || !d.n.is_multiple_of(2)) {
        bail!("small_linear: the fused K/V write takes a plain product of an even width");
    }
    let rows = match (swiglu, pairs) {
        (true, _) => "g",
        (false, true) => "q",
        (false, false) => "p",
    };
    // 16-byte loads a lane keeps in registers: 8 when the row fits (more warps resident)
    let per_load = 16 / dt.size_in_bytes();
    let chunks = if d.k <= 8 * 32 * per_load { 8 } else { 16 };
    let name = format!("small_linear_{}_{rows}_{chunks}_{}", d.m, suffix(dt)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let shared = (d.m + 1) * d.k * 4;
    allow_shared(&dev, &func, &name, SMALL_SHARED, 100)?;
    // a persistent grid: as many blocks as stay resident (each stages and normalises x once,
    // then its warps stream rows, fetching the next row while reducing the current one)
    let units = if pairs { d.n / 2 } else { d.n };
    // by output rows, not units: GPT-XL's wqkv (3,840 rows in 1,920 pairs) takes 8 warps, 0.9 us
    // faster per launch than 4 on an H200 (docs/BENCHMARKS.md §00000010 run 6)
    let warps = small_warps(d.n);
    let resident = resident_blocks(&dev, &func, &name, 32 * warps as u32, shared)?;
    let blocks = units.div_ceil(warps).min(resident).max(1) as u32;
    let cfg = launch_cfg((blocks, 1, 1), 32 * warps as u32, shared);
    let norm_g = norm.map(|(t, e)| (t.storage_and_layout(), *e));
    let res_g = residual.map(|t| t.storage_and_layout());
    let kv_g = op
        .kv
        .as_ref()
        .map(|f| (f.kv.storage_and_layout(), f.rope.storage_and_layout(), f));
    let mode: i32 = if swiglu {
        2
    } else if residual.is_some() {
        1
    } else {
        0
    };
    let (k, n) = (d.k as i32, d.n as i32);
    typed!(dt, T => {
        let (a, b) = offsets(xl)?;
        let xs = x.as_cuda_slice::<T>()?.slice(a..b);
        let (a, b) = offsets(wl)?;
        if !(a * std::mem::size_of::<T>()).is_multiple_of(16) {
            bail!("small_linear: the weight view is not 16-byte aligned");
        }
        let ws = w.as_cuda_slice::<T>()?.slice(a..b);
        let ns = match &norm_g {
            Some(((g, l), _)) => Some(held_view::<T>(g, l, "the norm weight")?),
            None => None,
        };
        let eps = norm_g.as_ref().map_or(0f32, |(_, e)| *e);
        let rs = held_view_opt::<T, _>(&res_g, "the residual")?;
        // the fused K/V write: the cache (whole buffer, its view's start passed as `base`),
        // the RoPE rows and the cache's shape
        let (kvs, rope, kv_base, kv_ints) = match &kv_g {
            Some(((kg, kl), (rg, rl), f)) => {
                let c = &f.cache;
                let ints = [
                    f.rope_rows,
                    f.heads.h,
                    c.kvh,
                    c.hd,
                    c.layer,
                    c.n_layer,
                    c.max_len,
                    f.at,
                ]
                .map(|v| v as i32);
                (
                    Some(held::<T>(kg, "the KV cache")?.slice(0..)),
                    Some(held_view::<f32>(rg, rl, "the RoPE table")?),
                    kl.start_offset() as u64,
                    ints,
                )
            }
            None => (None, None, 0u64, [0i32; 8]),
        };
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(d.m * d.n)? };
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(&xs);
        builder.arg(&ws);
        builder.arg(&ns);
        builder.arg(&eps);
        builder.arg(&rs);
        builder.arg(&out);
        builder.arg(&k);
        builder.arg(&n);
        builder.arg(&mode);
        builder.arg(&kvs);
        builder.arg(&kv_base);
        builder.arg(&rope);
        for v in &kv_ints {
            builder.arg(v);
        }
        // SAFETY: argument list matches the kernel's signature; shapes checked by the caller
        // (the cache's by `CacheLayer::check` in small_linear_kv).
        unsafe { builder.launch(cfg) }?;
        Ok(wrap(out, &dev))
    })
}

/// See [`super::probe::read_probe`].
pub(super) fn read_probe(buf: &Tensor, probe: super::probe::ReadProbe) -> Result<()> {
    use super::probe::ReadProbe;
    let (g, l) = buf.storage_and_layout();
    let Storage::Cuda(c) = &*g else {
        bail!("read probe: the buffer is not on the GPU");
    };
    let dev = c.device().clone();
    let (a, b) = offsets(l)?;
    let el = buf.dtype().size_in_bytes();
    let bytes = ((b - a) * el) as u64 & !15;
    if !(a * el).is_multiple_of(16) {
        bail!("read probe: the buffer is not 16-byte aligned");
    }
    let stream = dev.cuda_stream();
    let (ReadProbe::Loads { blocks_per_sm, .. } | ReadProbe::Bulk { blocks_per_sm, .. }) = probe;
    let blocks = (sm_count(&dev)? * blocks_per_sm) as u32;
    // SAFETY: never read; a block writes its word only on a checksum hit (run 1 of §0000 used
    // alloc_zeros, whose memset node added to the probes' fixed cost).
    let out = unsafe { dev.alloc::<u32>(blocks as usize)? };
    typed!(buf.dtype(), T => {
        let src = c.as_cuda_slice::<T>()?.slice(a..b);
        match probe {
            ReadProbe::Loads { unroll, .. } => {
                let name = format!("probe_loads_{unroll}");
                let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                let n16 = bytes / 16;
                let mut l = Launch::new(&func, &stream);
                l.arg(&src).arg(&n16).arg(&out);
                // SAFETY: matches probe_loads_U(const uint4 *, u64, unsigned *); reads < n16.
                unsafe { l.launch(launch_cfg((blocks, 1, 1), 256, 0)) }
            }
            ReadProbe::Bulk { chunk, stages, .. } => {
                if stages > 32 || !chunk.is_multiple_of(16) {
                    bail!("read probe: at most 32 stages of a multiple of 16 bytes");
                }
                let func = dev.get_or_load_custom_func("probe_bulk", MODULE, PTX)?;
                let shared = chunk * stages;
                allow_shared(&dev, &func, "probe_bulk", 200 * 1024, 100)?;
                let per = bytes.div_ceil(blocks as u64).next_multiple_of(16);
                let (chunk, stages) = (chunk as i32, stages as i32);
                let mut l = Launch::new(&func, &stream);
                l.arg(&src).arg(&bytes).arg(&per).arg(&out).arg(&chunk).arg(&stages);
                // SAFETY: matches probe_bulk's signature; each block stays inside its share.
                unsafe { l.launch(launch_cfg((blocks, 1, 1), 256, shared)) }
            }
        }
    })
}

/// See [`super::move_slots`] (which checks the dims and slots): one pitched device-to-device
/// copy (`cuMemcpy2DAsync`), a row per (plane, layer, batch row, head) of the cache tensor.
pub(super) fn move_slots(kv: &Tensor, from: usize, to: usize, s: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{sys, DevicePtr};
    let &[planes, layers, b, kvh, max_len, hd] = kv.dims() else {
        bail!("move_slots: {:?} is not a cache tensor", kv.dims());
    };
    let (g, l) = kv.storage_and_layout();
    let Storage::Cuda(c) = &*g else {
        bail!("move_slots: the cache is not on the GPU");
    };
    let (a, _) = offsets(l)?;
    let dev = c.device().clone();
    let stream = dev.cuda_stream();
    let el = kv.dtype().size_in_bytes();
    typed!(kv.dtype(), T => {
        let slice = c.as_cuda_slice::<T>()?;
        let (ptr, _guard) = slice.device_ptr(&stream);
        let base = ptr + (a * el) as u64;
        let pitch = max_len * hd * el;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: from * hd * el,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: base,
            srcArray: std::ptr::null_mut(),
            srcPitch: pitch,
            dstXInBytes: to * hd * el,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: base,
            dstArray: std::ptr::null_mut(),
            dstPitch: pitch,
            WidthInBytes: s * hd * el,
            Height: planes * layers * b * kvh,
        };
        stream.context().bind_to_thread().w()?;
        // SAFETY: both ranges lie inside the cache tensor (checked above) and do not overlap;
        // the copy is ordered on candle's stream like every other use of the cache.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
            .result()
            .w()?;
        Ok(())
    })
}

/// See [`super::gather_slots`]: 16-byte chunks, one thread each.
pub(super) fn gather_slots(
    kv: &mut CudaStorage,
    kl: &Layout,
    idx: &CudaStorage,
    il: &Layout,
    from: usize,
    to: usize,
) -> Result<()> {
    let &[planes, layers, b, kvh, max_len, hd] = kl.dims() else {
        bail!("gather_slots: {:?} is not a cache tensor", kl.dims());
    };
    let el = kv.dtype().size_in_bytes();
    let (k0, _) = offsets(kl)?;
    if !(hd * el).is_multiple_of(16) || !(k0 * el).is_multiple_of(16) {
        bail!(
            "gather_slots: cache rows of {} bytes at offset {k0} are not 16-byte chunks",
            hd * el
        );
    }
    let dev = kv.device().clone();
    let func = dev.get_or_load_custom_func("gather_slots_u4", MODULE, PTX)?;
    let (a, z) = offsets(il)?;
    let idx = idx.as_cuda_slice::<u32>()?.slice(a..z);
    let m = (z - a) / b.max(1);
    let chunks = hd * el / 16;
    let total = (planes * layers * b * kvh * m * chunks) as u64;
    let base = (k0 * el / 16) as u64;
    let ints = [from, to, m, b, kvh, max_len, chunks].map(|v| v as i32);
    let threads = 256u32;
    let blocks = total.div_ceil(threads as u64).clamp(1, 65_535) as u32;
    typed!(kv.dtype(), T => {
        let kv = kv.as_cuda_slice_mut::<T>()?;
        let stream = dev.cuda_stream();
        let mut builder = Launch::new(&func, &stream);
        builder.arg(kv);
        builder.arg(&base);
        builder.arg(&idx);
        for v in &ints {
            builder.arg(v);
        }
        builder.arg(&total);
        // SAFETY: argument list matches gather_slots_u4's signature; the slots lie inside the
        // cache and the source block past the destination (checked by the caller).
        unsafe { builder.launch(launch_cfg((blocks, 1, 1), threads, 0)) }?;
        Ok(())
    })
}

/// See [`super::contiguous_f32_to_host`].
pub(super) fn contiguous_f32_to_host(t: &Tensor) -> Result<Option<Vec<f32>>> {
    let (g, l) = t.storage_and_layout();
    let (Storage::Cuda(c), Some((a, b))) = (&*g, l.contiguous_offsets()) else {
        return Ok(None);
    };
    let view = c.as_cuda_slice::<f32>()?.slice(a..b);
    Ok(Some(c.device().clone_dtoh(&view)?))
}

/// See [`super::clamp_rows`]: `n` positions.
pub(super) fn clamp_rows(
    pos: &CudaStorage,
    l: &Layout,
    n: usize,
    rows: u32,
    zero: u32,
) -> Result<CudaStorage> {
    let dev = pos.device().clone();
    let func = dev.get_or_load_custom_func("clamp_rows_u32", MODULE, PTX)?;
    let (a, b) = offsets(l)?;
    let src = pos.as_cuda_slice::<u32>()?.slice(a..b);
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<u32>(n)? };
    let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
    let (n, rows, zero) = (n as i32, rows as i32, zero as i32);
    let stream = dev.cuda_stream();
    let mut builder = Launch::new(&func, &stream);
    builder.arg(&src);
    builder.arg(&out);
    builder.arg(&n);
    builder.arg(&rows);
    builder.arg(&zero);
    // SAFETY: argument list matches clamp_rows_u32's signature; both buffers hold n elements.
    unsafe { builder.launch(launch_cfg((blocks, 1, 1), 256, 0)) }?;
    Ok(wrap(out, &dev))
}

/// See [`super::place_mask`].
pub(super) fn place_mask(
    op: &PlaceMask,
    d: &mut CudaStorage,
    dl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    let PlaceMask {
        rows,
        len,
        s,
        max_len,
        ..
    } = op;
    let (rows, len, s, max_len) = (*rows, *len, *s, *max_len);
    let dev = d.device().clone();
    let func = dev.get_or_load_custom_func("place_mask_f32", MODULE, PTX)?;
    let (a, b) = offsets(sl)?;
    let src = src.as_cuda_slice::<f32>()?.slice(a..b);
    let (da, db) = offsets(dl)?;
    let mut dst = d.as_cuda_slice_mut::<f32>()?.slice_mut(da..db);
    let n = rows * max_len;
    let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
    let ints = [rows, len, s, max_len].map(|v| v as i32);
    let filled_g = op.filled.as_ref().map(|f| f.storage_and_layout());
    let filled = held_view_opt::<u32, _>(&filled_g, "the filled length")?;
    let stream = dev.cuda_stream();
    let mut l = Launch::new(&func, &stream);
    l.arg(&src).arg(&mut dst);
    for v in &ints {
        l.arg(v);
    }
    l.arg(&filled);
    // SAFETY: matches place_mask_f32(const float *, float *, int x4, unsigned *); both views
    // cover the masks' elements (checked by the caller), `filled` one u32 (or null).
    unsafe { l.launch(launch_cfg((blocks, 1, 1), 256, 0)) }
}
