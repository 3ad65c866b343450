//! Launch of the decode-layer kernel (`decode_layer.cu`, its own PTX module: its 24 variants
//! are compiled by the driver only when a decode step first needs one).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage};

use super::cuda::{
    allow_shared, env_number, held, held_view, held_view_opt, launch_cfg, offsets, resident_blocks,
    suffix, wrap,
};
use super::launch::Launch;
use super::layer::{DecodeLayer, LayerDims, LAYER_SHARED, RING_STAGE, RING_STAGES_MAX};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_layer.ptx"));
const MODULE: &str = "lantern_decode_layer";
/// Warps per block (`NW` in the kernel).
const WARPS: usize = 8;
/// Keys per attention chunk, at most (`CK_MAX` in the kernel).
const CHUNK_MAX: usize = 128;

fn env_flag(name: &str, default: bool) -> bool {
    std::env::var(name).map_or(default, |v| v == "1")
}

/// Cooperative launches (the driver guarantees that the whole grid is resident, which the
/// kernel's barriers need, or fails the launch); `LANTERN_LAYER_COOP=0` launches plainly.
fn cooperative() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_flag("LANTERN_LAYER_COOP", true))
}

/// `LANTERN_LAYER_SKIP=mask`: skip the work of phases (bit 0 wqkv, 1 attention, 2 wo, 3 gate/up,
/// 4 w2; bit 5: also the staging of x; bit 6: the grid barriers too). The weights still stream.
/// A timing diagnostic for the kernel bench: the output is wrong.
fn skip_mask() -> i32 {
    static M: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *M.get_or_init(|| env_number("LANTERN_LAYER_SKIP").unwrap_or(0))
}

/// `LANTERN_LAYER_STAGES=n` (1 to [`RING_STAGES_MAX`], default 2: measured fastest, docs/BENCHMARKS.md
/// §0000000b): weight-stream stages a warp keeps in flight, and so the rings' size (a bench
/// switch: with fewer, two blocks fit on an SM, so that with `LANTERN_LAYER_BLOCKS` at the SM
/// count the next layer's kernel could become resident under PDL; measured no faster).
fn stages() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        env_number("LANTERN_LAYER_STAGES")
            .filter(|n| (1..=RING_STAGES_MAX).contains(n))
            .unwrap_or(2)
    })
}

/// `LANTERN_LAYER_BLOCKS=n`: at most n blocks (a bench switch; default: all that stay resident).
fn block_cap() -> Option<usize> {
    static N: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *N.get_or_init(|| env_number("LANTERN_LAYER_BLOCKS").filter(|&n| n > 0))
}

/// The grid barrier (2 words) and the attention chunks' arrival counters (one per batch row
/// and head) of a device. The kernel leaves them all zero but the barrier's generation, so one
/// buffer serves every launch on the device's stream; it is made on first use, outside any
/// CUDA graph capture (a graph step's first call runs eagerly).
fn sync_words(dev: &CudaDevice, words: usize) -> Result<CudaSlice<u32>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    use candle_core::cuda_backend::WrapErr;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BUFS: OnceLock<Mutex<HashMap<DeviceId, CudaSlice<u32>>>> = OnceLock::new();
    let mut bufs = BUFS
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    if let Some(b) = bufs.get(&dev.id()).filter(|b| b.len() >= words) {
        return Ok(b.clone());
    }
    let stream = dev.cuda_stream();
    if stream.capture_status().w()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        bail!("decode layer: first used inside a CUDA graph capture; run one step eagerly first");
    }
    let b = stream.alloc_zeros::<u32>(words.max(4096)).w()?;
    bufs.insert(dev.id(), b.clone());
    Ok(b)
}

/// Keys per attention chunk: enough chunks that the (row, head, chunk) units fill the grid,
/// each at most [`CHUNK_MAX`] keys.
fn chunk_keys(keys: usize, heads: usize, blocks: usize) -> usize {
    let per_head = (blocks / heads.max(1)).max(1);
    keys.div_ceil(per_head)
        .next_multiple_of(32)
        .clamp(32, CHUNK_MAX)
}

pub(super) fn decode_layer(
    op: &DecodeLayer,
    d: &LayerDims,
    x: &CudaStorage,
    xl: &Layout,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    match x.dtype() {
        DType::BF16 => launch::<half::bf16>(op, d, &dev, x, xl),
        DType::F16 => launch::<half::f16>(op, d, &dev, x, xl),
        dt => bail!("decode layer: {dt:?} (bf16 or f16 only)"),
    }
}

fn launch<T: CudaDType + DeviceRepr>(
    op: &DecodeLayer,
    d: &LayerDims,
    dev: &CudaDevice,
    x: &CudaStorage,
    xl: &Layout,
) -> Result<CudaStorage> {
    let heads = op.heads;
    let hd = heads.hd;
    let (m, dim, ffn, a) = (d.m, d.dim, d.ffn, heads.h * hd);
    let mm = m.next_power_of_two();
    let name = format!("decode_layer_{hd}_{mm}_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let kmax = dim.max(a).max(ffn);
    // rows of x and the norm weight in the model dtype, or the attention's partial sums and a
    // group of 16 chunks (f32) while they are combined; then the warps' weight-stream rings
    let ring_at = ((mm * kmax + dim) * std::mem::size_of::<T>())
        .max((WARPS * hd + 16 * (hd + 2)) * 4)
        .next_multiple_of(16);
    let stages = stages();
    let shared = ring_at + RING_STAGE * stages;
    allow_shared(dev, &func, &name, LAYER_SHARED, 100)?;
    let resident = resident_blocks(dev, &func, &name, 32 * WARPS as u32, shared)?;
    let blocks = block_cap().map_or(resident, |c| c.min(resident));
    let ck = chunk_keys(op.keys, m * heads.h, blocks);
    let units = m * heads.h * op.keys.div_ceil(ck);

    // storage guards first, views of them after
    let tensors = [
        &op.wqkv,
        &op.attn_norm,
        &op.wo,
        &op.ffn_norm,
        &op.w13,
        &op.w2,
    ];
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let (rope_g, rope_l) = op.rope.storage_and_layout();
    let (kv_g, kv_l) = op.kv.storage_and_layout();
    let mask_g = op.mask.as_ref().map(|(t, _)| t.storage_and_layout());
    let names = ["wqkv", "attention norm", "wo", "ffn norm", "w1|w3", "w2"];
    let w = guards
        .iter()
        .zip(names)
        .map(|((g, l), n)| view::<T>(g, l, n))
        .collect::<Result<Vec<_>>>()?;
    let rope = held_view::<f32>(&rope_g, rope_l, "the RoPE table")?;
    let kv = held::<T>(&kv_g, "the KV cache")?;
    let base = kv_l.start_offset() as u64;
    if !(kv_l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16) {
        bail!("decode layer: the cache view is not 16-byte aligned");
    }
    let mask = held_view_opt::<f32, _>(&mask_g, "the mask")?;
    let mask_b = match &op.mask {
        Some((_, true)) => op.keys as i64,
        _ => 0,
    };
    let (xa, xb) = offsets(xl)?;
    let xs = x.as_cuda_slice::<T>()?.slice(xa..xb);
    let sync = sync_words(dev, 2 + m * heads.h)?;
    // SAFETY: every element of out, of the scratch rows and of the used partials is written
    // by the kernel before it is read.
    let (out, scratch, part) = unsafe {
        (
            dev.alloc::<T>(m * dim)?,
            dev.alloc::<T>(m * (2 * a + dim + ffn))?,
            dev.alloc::<f32>(units.max(1) * (hd + 2))?,
        )
    };
    let qr = scratch.slice(0..m * a);
    let att = scratch.slice(m * a..2 * m * a);
    let hm = scratch.slice(2 * m * a..2 * m * a + m * dim);
    let f = scratch.slice(2 * m * a + m * dim..);
    let eps = op.eps;
    let rope_rows = d.rope_rows as i32;
    let ints_b = [d.cache.n_layer, d.cache.max_len, op.layer, op.at, op.keys].map(|v| v as i32);
    let ints_c = [m, dim, heads.h, heads.kvh, ffn, ck, ring_at, stages].map(|v| v as i32);
    let skip = skip_mask();
    let stream = dev.cuda_stream();
    let mut b = Launch::new(&func, &stream);
    b.arg(&xs);
    b.arg(&out);
    for v in &w {
        b.arg(v);
    }
    b.arg(&eps);
    b.arg(&rope);
    b.arg(&rope_rows);
    b.arg(kv);
    b.arg(&base);
    for v in &ints_b {
        b.arg(v);
    }
    b.arg(&mask);
    b.arg(&mask_b);
    b.arg(&qr);
    b.arg(&att);
    b.arg(&hm);
    b.arg(&f);
    b.arg(&part);
    b.arg(&sync);
    for v in &ints_c {
        b.arg(v);
    }
    b.arg(&skip);
    let cfg = launch_cfg((blocks as u32, 1, 1), 32 * WARPS as u32, shared);
    // SAFETY: the argument list matches the kernel's signature; every shape was checked by
    // `DecodeLayer::dims`, and the grid is no larger than what stays resident (its barriers
    // need every block running).
    unsafe { b.launch_with(cfg, cooperative()) }?;
    Ok(wrap(out, dev))
}

/// A held weight's view ([`held_view`]), checked to start on a 16-byte boundary (the kernel's
/// vector loads).
fn view<'a, T: CudaDType>(
    g: &'a Storage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !(l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16) {
        bail!("decode layer: the {what} view is not 16-byte aligned");
    }
    held_view(g, l, what)
}
