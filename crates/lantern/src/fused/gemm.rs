//! Projections of many rows on CUDA (tree verification, prefill, the drafter's forward, the
//! output head) through cuBLASLt with the algorithm chosen once per shape.
//!
//! candle's matmul asks cuBLAS for its default algorithm without a workspace; at our shapes
//! (tens to a few hundred rows against 3-42 MB weight matrices) that choice leaves most SMs
//! idle. cuBLASLt offers candidates with split-K and other tile shapes when given a
//! workspace. [`GemmPolicy`] says which one runs: cuBLASLt's first heuristic answer, or the
//! fastest of its candidates timed on the first call of each shape (outside any CUDA graph
//! capture, with the L2 cache flushed before every timed call, as a model's weights arrive in
//! a real step). Split-K candidates are limited to reductions in f32 (the compute type): the
//! in-place and output-type schemes would add partial sums in bf16.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
use candle_core::cuda_backend::cudarc::driver::{
    sys as dsys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::{DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

use super::cuda::offsets;
use super::LinearDims;

/// How projections of many rows pick their GEMM on CUDA (`LANTERN_GEMM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPolicy {
    /// candle's matmul (cuBLAS's default algorithm, no workspace): `LANTERN_GEMM=cublas`.
    Cublas,
    /// cuBLASLt's first heuristic answer for the shape: `LANTERN_GEMM=heuristic`.
    Heuristic,
    /// cuBLASLt's candidates timed on first use of a shape, the fastest kept (the first
    /// answer unless another is 3% faster): `LANTERN_GEMM=timed`.
    Timed,
}

/// The default policy: candle's matmul. On an H200 at GPT-XL shapes cuBLASLt's first answer
/// and the timed choice were within the noise of it (docs/BENCHMARKS.md §00000010: every
/// candidate of every shape within ~10% of the others, step times within ±1%), so the simpler
/// path stays the default and the others are opt-in (other cards, other shapes).
pub const DEFAULT_POLICY: GemmPolicy = GemmPolicy::Cublas;

/// A process-wide override of `LANTERN_GEMM` (tests); 0 = none.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Overrides `LANTERN_GEMM` for this process (`None` returns to it). Shapes already planned
/// keep their algorithm until [`forget_plans`].
pub fn set_gemm_policy(p: Option<GemmPolicy>) {
    let v = match p {
        None => 0,
        Some(GemmPolicy::Cublas) => 1,
        Some(GemmPolicy::Heuristic) => 2,
        Some(GemmPolicy::Timed) => 3,
    };
    OVERRIDE.store(v, Ordering::Relaxed);
}

/// The policy in force: [`set_gemm_policy`]'s, else `LANTERN_GEMM`, else [`DEFAULT_POLICY`].
pub fn gemm_policy() -> Result<GemmPolicy> {
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => return Ok(GemmPolicy::Cublas),
        2 => return Ok(GemmPolicy::Heuristic),
        3 => return Ok(GemmPolicy::Timed),
        _ => {}
    }
    static ENV: OnceLock<std::result::Result<GemmPolicy, String>> = OnceLock::new();
    ENV.get_or_init(|| match std::env::var("LANTERN_GEMM").as_deref() {
        Err(_) | Ok("") => Ok(DEFAULT_POLICY),
        Ok("cublas") => Ok(GemmPolicy::Cublas),
        Ok("heuristic") => Ok(GemmPolicy::Heuristic),
        Ok("timed") => Ok(GemmPolicy::Timed),
        Ok(v) => Err(format!(
            "LANTERN_GEMM={v} is not a GEMM policy: use cublas, heuristic or timed"
        )),
    })
    .clone()
    .map_err(candle_core::Error::Msg)
}

/// One shape's problem: rows, output columns, inner size and dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    timed: bool,
}

/// A planned shape: descriptors and the chosen algorithm (made once, kept for the process).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A device's cuBLASLt handle, workspace and plans.
struct DeviceLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, Plan>,
}

// SAFETY: the raw handles are only used under the mutex of `STATES`, and cuBLASLt handles and
// descriptors may be used from any thread.
unsafe impl Send for DeviceLt {}

static STATES: OnceLock<Mutex<HashMap<DeviceId, DeviceLt>>> = OnceLock::new();

/// Workspace for split-K partial sums (cuBLAS's recommendation for Hopper; 4 MiB before it).
fn workspace_bytes(dev: &CudaDevice) -> Result<usize> {
    let major = dev
        .cuda_stream()
        .context()
        .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    Ok(if major >= 9 { 32 << 20 } else { 4 << 20 })
}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// Drops every planned shape (tests switch policies; the descriptors are leaked).
pub fn forget_plans() {
    if let Some(s) = STATES.get() {
        for st in s.lock().expect("not poisoned").values_mut() {
            st.plans.clear();
        }
    }
}

/// What one timed shape chose, for the log (`LANTERN_GEMM_LOG=1`).
fn log_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_GEMM_LOG").is_ok_and(|v| v == "1"))
}

/// `y = x · wᵀ`: `x` `[m, k]` and `w` `[n, k]` row-major views, `y` `[m, n]`.
pub(super) fn linear(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    d: &LinearDims,
    timed: bool,
) -> Result<CudaStorage> {
    let (m, n, k) = (d.m, d.n, d.k);
    let dt = x.dtype();
    if w.dtype() != dt {
        bail!("linear: input {dt:?} vs weight {:?}", w.dtype());
    }
    match dt {
        DType::BF16 => run::<half::bf16>(x, xl, w, wl, m, n, k, timed),
        DType::F16 => run::<half::f16>(x, xl, w, wl, m, n, k, timed),
        d => bail!("linear: cuBLASLt path for {d:?} not built (bf16 and f16 are)"),
    }
}

fn data_type(dt: DType) -> sys::cudaDataType {
    match dt {
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        _ => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    m: usize,
    n: usize,
    k: usize,
    timed: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let stream = dev.cuda_stream();
    let (a0, a1) = offsets(xl)?;
    let xs = x.as_cuda_slice::<T>()?.slice(a0..a1);
    let (b0, b1) = offsets(wl)?;
    let ws = w.as_cuda_slice::<T>()?.slice(b0..b1);
    // SAFETY: every element is written by the product before anyone reads it.
    let mut out = unsafe { dev.alloc::<T>(m * n)? };
    let mut states = STATES
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    let st = match states.entry(dev.id()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
            let bytes = workspace_bytes(&dev)?;
            let workspace = stream.alloc_zeros::<u8>(bytes).w()?;
            v.insert(DeviceLt {
                handle,
                workspace,
                plans: HashMap::new(),
            })
        }
    };
    let key = Key {
        m,
        n,
        k,
        dtype: x.dtype(),
        timed,
    };
    let wbytes = st.workspace.len();
    let (xp, _gx) = xs.device_ptr(&stream);
    let (wp, _gw) = ws.device_ptr(&stream);
    let (yp, _gy) = out.device_ptr_mut(&stream);
    let (sp, _gs) = st.workspace.device_ptr(&stream);
    let ptrs = Ptrs {
        x: xp as *const c_void,
        w: wp as *const c_void,
        y: yp as *mut c_void,
        ws: sp as *mut c_void,
        ws_bytes: wbytes,
    };
    if !st.plans.contains_key(&key) {
        let plan = make_plan(st.handle, &stream, key, &ptrs)?;
        st.plans.insert(key, plan);
    }
    let plan = &st.plans[&key];
    // SAFETY: the descriptors describe exactly the views above (dims checked by the caller).
    unsafe { matmul(st.handle, plan, &plan.algo, &ptrs, &stream) }
        .map_err(|e| lt_err("matmul", e))?;
    drop((_gx, _gw, _gy, _gs));
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Raw pointers of one call.
struct Ptrs {
    x: *const c_void,
    w: *const c_void,
    y: *mut c_void,
    ws: *mut c_void,
    ws_bytes: usize,
}

/// # Safety
/// `plan`'s descriptors must match the pointers' buffers.
unsafe fn matmul(
    handle: sys::cublasLtHandle_t,
    plan: &Plan,
    algo: &sys::cublasLtMatmulAlgo_t,
    p: &Ptrs,
    stream: &CudaStream,
) -> std::result::Result<(), lt::CublasError> {
    let (one, zero) = (1f32, 0f32);
    // column-major: y (n x m) = op(w) (n x k) * x (k x m), with w stored k x n (transposed)
    lt::matmul(
        handle,
        plan.desc,
        (&one) as *const f32 as *const c_void,
        (&zero) as *const f32 as *const c_void,
        p.w,
        plan.a,
        p.x,
        plan.b,
        p.y as *const c_void,
        plan.c,
        p.y,
        plan.c,
        algo,
        p.ws,
        p.ws_bytes,
        stream.cu_stream() as sys::cudaStream_t,
    )
}

/// Describes the problem and picks its algorithm (see [`GemmPolicy`]).
fn make_plan(
    handle: sys::cublasLtHandle_t,
    stream: &std::sync::Arc<CudaStream>,
    key: Key,
    p: &Ptrs,
) -> Result<Plan> {
    let e = |what: &'static str| move |err: lt::CublasError| lt_err(what, err);
    let dt = data_type(key.dtype);
    let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType_t::CUDA_R_32F,
    )
    .map_err(e("descriptor"))?;
    let trans: i32 = 1; // CUBLAS_OP_T
                        // SAFETY: the descriptor was just created; the attribute is an int32.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans) as *const i32 as *const c_void,
            std::mem::size_of::<i32>(),
        )
    }
    .map_err(e("transpose"))?;
    let a = lt::create_matrix_layout(dt, k, n, k as i64).map_err(e("layout"))?;
    let b = lt::create_matrix_layout(dt, k, m, k as i64).map_err(e("layout"))?;
    let c = lt::create_matrix_layout(dt, n, m, n as i64).map_err(e("layout"))?;
    let pref = lt::create_matmul_pref().map_err(e("preference"))?;
    let bytes = p.ws_bytes;
    // split-K partial sums only in f32 (no in-place or output-type reduction)
    let mask: u32 = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
    // SAFETY: the preference was just created; the attributes are a size_t and a uint32.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&bytes) as *const usize as *const c_void,
            std::mem::size_of::<usize>(),
        )
        .map_err(e("workspace preference"))?;
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
            (&mask) as *const u32 as *const c_void,
            std::mem::size_of::<u32>(),
        )
        .map_err(e("reduction preference"))?;
    }
    const WANT: usize = 16;
    // SAFETY: plain data written by the call below.
    let mut found: Vec<sys::cublasLtMatmulHeuristicResult_t> =
        vec![unsafe { std::mem::zeroed() }; WANT];
    let mut count = 0i32;
    // SAFETY: every descriptor is valid; `found` has room for WANT answers.
    unsafe {
        sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            a,
            b,
            c,
            c,
            pref,
            WANT as i32,
            found.as_mut_ptr(),
            &mut count,
        )
        .result()
        .map_err(e("heuristic"))?;
        lt::destroy_matmul_pref(pref).map_err(e("preference"))?;
    }
    let found: Vec<_> = found
        .into_iter()
        .take(count.max(0) as usize)
        .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
        .collect();
    let Some(first) = found.first() else {
        bail!("cuBLASLt has no algorithm for a {m}x{k} by {k}x{n} product in {dt:?}");
    };
    let mut plan = Plan {
        desc,
        a,
        b,
        c,
        algo: first.algo,
    };
    let capturing =
        stream.capture_status().w()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    if key.timed && found.len() > 1 && !capturing {
        let algos: Vec<_> = found.iter().map(|r| r.algo).collect();
        let (pick, times) = time_candidates(handle, stream, &plan, &algos, p)?;
        plan.algo = algos[pick];
        if log_enabled() {
            let us: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
            eprintln!(
                "gemm {}x{}x{} {:?}: candidate {pick} of {} (median us per candidate: {}; split-K {})",
                key.m,
                key.n,
                key.k,
                key.dtype,
                algos.len(),
                us.join(" "),
                split_k(&plan.algo)
            );
        }
    } else if log_enabled() {
        eprintln!(
            "gemm {}x{}x{} {:?}: first heuristic answer of {} (split-K {})",
            key.m,
            key.n,
            key.k,
            key.dtype,
            found.len(),
            split_k(&plan.algo)
        );
    }
    Ok(plan)
}

fn split_k(algo: &sys::cublasLtMatmulAlgo_t) -> i32 {
    let mut v = 0i32;
    let mut written = 0usize;
    // SAFETY: reads one int32 attribute of a valid algorithm.
    let _ = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
            (&mut v) as *mut i32 as *mut c_void,
            std::mem::size_of::<i32>(),
            &mut written,
        )
    };
    v
}

/// Times every candidate (7 rounds, candidates interleaved, the L2 cache flushed before each
/// call) and returns the chosen index with each candidate's median µs: the first answer unless
/// another is at least 3% faster.
fn time_candidates(
    handle: sys::cublasLtHandle_t,
    stream: &std::sync::Arc<CudaStream>,
    plan: &Plan,
    algos: &[sys::cublasLtMatmulAlgo_t],
    p: &Ptrs,
) -> Result<(usize, Vec<f32>)> {
    const ROUNDS: usize = 7;
    let ctx = stream.context();
    let l2 = ctx
        .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .w()?
        .max(1 << 20) as usize;
    let flush = stream.alloc_zeros::<u8>(2 * l2).w()?;
    let (fp, _gf) = flush.device_ptr(stream);
    let timing = Some(dsys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (ctx.new_event(timing).w()?, ctx.new_event(timing).w()?);
    let mut times = vec![Vec::with_capacity(ROUNDS); algos.len()];
    for round in 0..=ROUNDS {
        for (i, algo) in algos.iter().enumerate() {
            // SAFETY: the flush buffer is ours and 2 * l2 bytes long.
            unsafe { dsys::cuMemsetD8Async(fp, (round + i) as u8, 2 * l2, stream.cu_stream()) }
                .result()
                .w()?;
            start.record(stream).w()?;
            // SAFETY: the plan describes the call's buffers.
            let ok = unsafe { matmul(handle, plan, algo, p, stream) }.is_ok();
            end.record(stream).w()?;
            let ms = start.elapsed_ms(&end).w()?;
            // round 0 warms every candidate up (module loads) and is not counted
            if round > 0 {
                times[i].push(if ok { ms * 1e3 } else { f32::INFINITY });
            }
        }
    }
    drop(_gf);
    let medians: Vec<f32> = times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f32::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    let best = (0..medians.len())
        .min_by(|&a, &b| medians[a].total_cmp(&medians[b]))
        .unwrap_or(0);
    let pick = if medians[best] < 0.97 * medians[0] {
        best
    } else {
        0
    };
    Ok((pick, medians))
}
