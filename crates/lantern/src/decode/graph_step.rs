//! Target forwards as fixed-shape computations, replayed as CUDA graphs on GPUs.
//!
//! A decode or tree-verification step of a 0.8B model at batch 2 is launch-bound: ~1000 small
//! kernels, each costing more host time than GPU time. Capturing a step once and replaying it
//! removes the host cost, but a graph replays the same kernels with the same arguments, so
//! everything that changes from call to call lives in device buffers overwritten in place
//! before each launch: token ids, RoPE positions and an additive mask over *all* cache slots
//! (which also carries tree structure, holes and caption padding). The new K/V go to a fixed
//! staging block at the end of the cache (the cache's staging mode, [`KvCache::set_staging`]),
//! from which two copies after the launch move them to the filled length (a device-side scatter
//! would loop over the block in every thread). Attention's launch spans the whole cache
//! capacity; the filled length also goes to a device buffer before each launch, from which the
//! attention kernels learn which slots between it and the staging block are empty and skip
//! them (the mask hides them too, so `LANTERN_LIVE_KEYS=0`, which visits every slot, gives the
//! same attention up to summation order).
//!
//! One [`GraphStep`] serves one shape (new tokens `s`, position layout); a loop keeps one per
//! shape it meets ([`GraphSteps`]). The first call of a shape runs eagerly (which also warms
//! kernels and candle's parameter cache) and then records the graph; later calls replay it.
//! Where capture is unavailable (CPU) the same fixed-shape path runs eagerly when forced
//! ([`force_fixed_shape`]), which is how the tests check it against the ordinary forward.
use crate::cache::KvCache;
use crate::models::drafter::Drafter;
use crate::models::llamagen::LlamaGen;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Graph replay of target steps is used on CUDA devices unless the environment sets
/// `LANTERN_CUDA_GRAPHS=0`.
pub fn graphs_enabled(device: &Device) -> bool {
    device.is_cuda() && std::env::var("LANTERN_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

thread_local! {
    static FORCE_FIXED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes this thread's target forwards take the fixed-shape path even where no graph can be
/// captured (the CPU), so that tests exercise what GPUs replay.
pub fn force_fixed_shape(on: bool) {
    FORCE_FIXED.with(|f| f.set(on));
}

/// Whether [`force_fixed_shape`] is on for this thread.
fn fixed_shape_forced() -> bool {
    FORCE_FIXED.with(|f| f.get())
}

/// A model whose step can run with fixed shapes (see [`LlamaGen::forward_fixed`]).
pub trait FixedForward {
    /// The device the model runs on.
    fn fixed_device(&self) -> &Device;
    /// Width and dtype of the step's output `[rows, s, width]`.
    fn fixed_output(&self) -> (usize, DType);
    /// One fixed-shape step (the cache in staging mode, `mask` over all slots, no host
    /// synchronisation); `features` only for models that take them (the drafter).
    fn fixed_step(
        &self,
        ids: &Tensor,
        features: Option<&Tensor>,
        pos: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor>;
}

impl FixedForward for LlamaGen {
    fn fixed_device(&self) -> &Device {
        self.device()
    }
    fn fixed_output(&self) -> (usize, DType) {
        (self.config().dim, self.dtype())
    }
    fn fixed_step(
        &self,
        ids: &Tensor,
        _features: Option<&Tensor>,
        pos: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let x = self.embed_tokens(ids)?;
        self.forward_fixed(&x, pos, mask, cache)
    }
}

impl FixedForward for Drafter {
    fn fixed_device(&self) -> &Device {
        self.device()
    }
    fn fixed_output(&self) -> (usize, DType) {
        (self.config().hidden_size, self.dtype())
    }
    fn fixed_step(
        &self,
        ids: &Tensor,
        features: Option<&Tensor>,
        pos: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let f = features
            .ok_or_else(|| Error::invalid("drafter step", "no feature buffer (internal error)"))?;
        self.forward_fixed(ids, f, pos, mask, cache)
    }
}

/// One fixed-shape step of `model` with the cache in the staging mode: new K/V written from slot
/// `at`, the attention skipping the empty slots from the device-held filled length `filled` up
/// to `in_use` (the mask must hide them); the cache leaves the staging mode again, also on an
/// error.
#[allow(clippy::too_many_arguments)]
pub(super) fn staged_step(
    model: &dyn FixedForward,
    cache: &mut KvCache,
    at: usize,
    (filled, in_use): (&Tensor, usize),
    ids: &Tensor,
    features: Option<&Tensor>,
    pos: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    cache.set_staging(Some(at));
    cache.set_filled_on_device(Some((filled.clone(), in_use)));
    let out = model.fixed_step(ids, features, pos, mask, cache);
    cache.set_filled_on_device(None);
    cache.set_staging(None);
    out
}

/// A fixed-shape step of `s` new tokens per row (target: embedding, blocks, final norm;
/// drafter: its layer over (feature, token) pairs).
pub struct GraphStep {
    ids: Tensor,
    /// Input features `[rows, s, d]` (drafter only).
    features: Option<Tensor>,
    pos: Tensor,
    mask: Tensor,
    /// The filled length (u32 `[1]`), written with the mask before each launch.
    filled: Tensor,
    hidden: Tensor,
    capture: bool,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph: Captured,
}

impl GraphStep {
    /// Buffers for `rows` rows of `s` tokens at positions shaped `pos_dims` (`[s]` or
    /// `[rows, s]`) over a cache of `max_len` slots; `capture` records a CUDA graph on the
    /// first call (on CUDA devices).
    /// `features` gives the width of a feature input (the drafter's).
    pub fn new(
        model: &dyn FixedForward,
        rows: usize,
        s: usize,
        pos_dims: &[usize],
        features: Option<usize>,
        max_len: usize,
        capture: bool,
    ) -> Result<Self> {
        let dev = model.fixed_device().clone();
        let (width, dtype) = model.fixed_output();
        let features = match features {
            Some(d) => Some(Tensor::zeros((rows, s, d), dtype, &dev)?),
            None => None,
        };
        Ok(Self {
            ids: Tensor::zeros((rows, s), DType::U32, &dev)?,
            features,
            pos: Tensor::zeros(pos_dims, DType::U32, &dev)?,
            mask: Tensor::zeros((rows, 1, s, max_len), DType::F32, &dev)?,
            filled: Tensor::zeros(1, DType::U32, &dev)?,
            hidden: Tensor::zeros((rows, s, width), dtype, &dev)?,
            capture,
            graph: Default::default(),
        })
    }

    /// Whether this step fits a call of these shapes.
    pub fn fits(&self, ids: &[usize], pos: &[usize], max_len: usize) -> bool {
        self.ids.dims() == ids && self.pos.dims() == pos && self.mask.dim(3).ok() == Some(max_len)
    }

    /// Whether the step replays a captured CUDA graph.
    pub fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.graph.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    /// Tokens per row.
    fn tokens(&self) -> usize {
        self.ids.dims()[1]
    }

    /// Slot of the staging block: the last `s` slots of the cache.
    fn staging_at(&self) -> Result<usize> {
        Ok(self.mask.dim(3)? - self.tokens())
    }

    /// The fixed-shape computation over the input buffers; every temporary is dropped before
    /// it returns, so a captured graph frees what it allocates.
    fn run(&self, model: &dyn FixedForward, cache: &mut KvCache) -> Result<()> {
        let at = self.staging_at()?;
        let h = staged_step(
            model,
            cache,
            at,
            (&self.filled, at),
            &self.ids,
            self.features.as_ref(),
            &self.pos,
            &self.mask,
        )?;
        self.hidden.slice_set(&h, 0, 0)?;
        Ok(())
    }

    /// Whether a block fits behind the filled length of `cache` (one this step [`fits`]) without
    /// reaching the staging block.
    ///
    /// [`fits`]: GraphStep::fits
    pub fn has_room(&self, cache: &KvCache) -> bool {
        self.staging_at()
            .is_ok_and(|at| cache.len() + self.tokens() <= at)
    }

    /// Runs `ids` `[rows, s]` at RoPE rows `pos` under the additive `mask` `[rows, 1, s,
    /// len + s]` (the usual layout: filled keys, then the block), appending K/V at the filled
    /// length; returns the post-norm hidden `[rows, s, dim]`. The caller checks
    /// [`GraphStep::has_room`] first (near a full cache the staging block would overlap).
    pub fn forward(
        &mut self,
        model: &dyn FixedForward,
        cache: &mut KvCache,
        ids: &Tensor,
        features: Option<&Tensor>,
        pos: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        // a deferred block moves to its slots first: the step's keys are the filled ones
        cache.settle()?;
        let (s, len) = (self.tokens(), cache.len());
        let (rows, one, ms, keys) = mask.dims4()?;
        if !self.fits(ids.dims(), pos.dims(), cache.max_len())
            || !self.has_room(cache)
            || (rows, one, ms, keys) != (self.ids.dim(0)?, 1, s, len + s)
        {
            return Err(Error::invalid(
                "fixed-shape step",
                format!(
                    "ids {:?}, positions {:?}, mask {:?} at length {len} do not fit buffers {:?}/{:?}/{:?} (internal error)",
                    ids.dims(),
                    pos.dims(),
                    mask.dims(),
                    self.ids.dims(),
                    self.pos.dims(),
                    self.mask.dims()
                ),
            ));
        }
        let drafter = features.is_some();
        let seg = |target: &'static str, draft: &'static str| {
            crate::decode::profile::mark_here(if drafter { draft } else { target })
        };
        let at = self.staging_at()?;
        // filled keys, -inf up to the staging slots at `at`, then the block, and the filled
        // length: one kernel
        crate::fused::place_mask(&self.mask, mask, len, Some(&self.filled))?;
        self.ids
            .slice_set(&ids.to_dtype(DType::U32)?.contiguous()?, 0, 0)?;
        self.pos
            .slice_set(&pos.to_dtype(DType::U32)?.contiguous()?, 0, 0)?;
        match (&self.features, features) {
            (Some(buf), Some(f)) if buf.dims() == f.dims() => {
                buf.slice_set(&f.to_dtype(buf.dtype())?.contiguous()?, 0, 0)?
            }
            (None, None) => {}
            _ => {
                return Err(Error::invalid(
                    "fixed-shape step",
                    "feature input does not match the step's buffer (internal error)",
                ))
            }
        }
        seg(
            "target step: graph inputs (mask, ids, positions)",
            "drafter step: graph inputs (mask, ids, positions, features)",
        )?;
        self.launch(model, cache)?;
        seg("target step: graph replay", "drafter step: graph replay")?;
        cache.commit_staging(at, s)?;
        seg(
            "target step: KV staging commit",
            "drafter step: KV staging commit",
        )?;
        let out = self.hidden.copy()?;
        seg("target step: output copy", "drafter step: output copy")?;
        Ok(out)
    }

    fn launch(&mut self, model: &dyn FixedForward, cache: &mut KvCache) -> Result<()> {
        let label = format!(
            "{:?} tokens, positions {:?}",
            self.ids.dims(),
            self.pos.dims()
        );
        let mut graph = std::mem::take(&mut self.graph);
        let r = replay_or_capture(
            model.fixed_device(),
            self.capture,
            &mut graph,
            &label,
            &mut || self.run(model, cache),
        );
        self.graph = graph;
        r
    }
}

/// A captured computation: a CUDA graph on CUDA builds, nothing otherwise.
#[cfg(feature = "cuda")]
pub type Captured = Option<candle_core::cuda_backend::cudarc::driver::CudaGraph>;
/// A captured computation: a CUDA graph on CUDA builds, nothing otherwise.
#[cfg(not(feature = "cuda"))]
pub type Captured = NoGraph;

/// What builds without CUDA capture: nothing.
#[derive(Debug, Default)]
pub struct NoGraph;

thread_local! {
    static CAPTURES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// CUDA graphs captured on this thread so far (the loop profile reports a generation's share:
/// a capture runs the step eagerly, then captures and instantiates it).
pub fn captures_on_this_thread() -> usize {
    CAPTURES.with(|c| c.get())
}

/// Runs `run` through `graph`: replays it when captured; otherwise runs `run` eagerly (which
/// computes this call's result and loads kernels and cuBLAS workspaces) and, when `capture` is
/// set on a CUDA device, records a second run as the graph (recorded, not executed: nothing is
/// written twice). `run` must not synchronise with the host or upload host data beyond
/// candle's dims/strides (which the capture caches on the device).
pub fn replay_or_capture(
    dev: &Device,
    capture: bool,
    graph: &mut Captured,
    label: &str,
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{sys, DriverError};
        let wrap = |e: DriverError| {
            Error::invalid(
                "CUDA graph",
                format!("{e:?}; run with LANTERN_CUDA_GRAPHS=0 to decode without graphs"),
            )
        };
        if let Some(g) = graph {
            return g.launch().map_err(wrap);
        }
        let Device::Cuda(cuda) = dev else {
            return run();
        };
        if !capture {
            return run();
        }
        // candle uploads the dims/strides of strided ops from host memory; with this guard the
        // eager run caches them on the device and the capture reuses them (a captured upload
        // would read freed host memory when replayed)
        let _htod_cache = cuda.enable_cuda_graph_htod_cache();
        run()?;
        dev.synchronize()?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(wrap)?;
        let ran = run();
        let g = stream
            .end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
            .map_err(wrap)?;
        ran?;
        if let Some(g) = &g {
            g.upload().map_err(wrap)?;
        }
        if std::env::var("LANTERN_GRAPH_DEBUG").is_ok() {
            eprintln!("[graph] captured {label}: {}", g.is_some());
        }
        *graph = g;
        CAPTURES.with(|c| c.set(c.get() + 1));
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dev, capture, graph, label);
        run()
    }
}

/// The graph steps of one generation, one per shape met (at most [`MAX_GRAPH_SHAPES`];
/// further shapes run the ordinary forward).
#[derive(Default)]
pub struct GraphSteps {
    steps: Vec<GraphStep>,
    /// Whole-tree drafting computations (drafter caches only).
    drafting: Vec<super::draft_graph::StaticDrafting>,
    /// Dynamic-tree drafting computations (drafter caches only).
    dynamic: Vec<super::dynamic_graph::DynamicDrafting>,
}

/// Shapes kept per generation before falling back to the ordinary forward.
pub const MAX_GRAPH_SHAPES: usize = 24;

impl GraphSteps {
    /// The step for these shapes, created (not yet captured) if there is room.
    pub fn get(
        &mut self,
        model: &dyn FixedForward,
        ids: &[usize],
        pos: &[usize],
        features: Option<usize>,
        max_len: usize,
        capture: bool,
    ) -> Result<Option<&mut GraphStep>> {
        let i = match self.steps.iter().position(|g| g.fits(ids, pos, max_len)) {
            Some(i) => i,
            None if self.steps.len() < MAX_GRAPH_SHAPES && ids.len() == 2 => {
                self.steps.push(GraphStep::new(
                    model, ids[0], ids[1], pos, features, max_len, capture,
                )?);
                self.steps.len() - 1
            }
            None => return Ok(None),
        };
        Ok(self.steps.get_mut(i))
    }

    /// Number of shapes held and how many of them replay a captured graph.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.steps.len(),
            self.steps.iter().filter(|g| g.is_captured()).count(),
        )
    }
}

impl std::fmt::Debug for GraphSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, c) = self.counts();
        write!(f, "GraphSteps({n} shapes, {c} captured)")
    }
}

/// What a pooled cache was made for: the model (its embedding table's tensor id, shared by
/// clones), batch rows and capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolKey {
    /// Id of a weight tensor of the model.
    pub model: candle_core::TensorId,
    /// Batch rows.
    pub rows: usize,
    /// Cache capacity in positions.
    pub max_len: usize,
}

/// Caches kept per thread for reuse by later generations.
pub const POOL_SIZE: usize = 4;

thread_local! {
    static POOL: std::cell::RefCell<Vec<(PoolKey, KvCache, GraphSteps)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A cache (emptied) and its captured graphs from an earlier generation with the same key.
/// Graphs bake the addresses of the cache and the weights, so they stay valid exactly as long
/// as both are reused together; capturing costs a few eager runs per shape, which would
/// otherwise be paid by every generation.
pub fn take_pooled(key: PoolKey) -> Option<(KvCache, GraphSteps)> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let i = p.iter().position(|(k, _, _)| *k == key)?;
        let (_, mut kv, graphs) = p.remove(i);
        kv.truncate(0);
        Some((kv, graphs))
    })
}

/// Keeps a cache and its graphs for [`take_pooled`] (the oldest entry beyond [`POOL_SIZE`]
/// is freed).
pub fn return_pooled(key: PoolKey, kv: KvCache, graphs: GraphSteps) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.push((key, kv, graphs));
        if p.len() > POOL_SIZE {
            p.remove(0);
        }
    });
}

/// A KV cache with its fixed-shape steps (CUDA graphs on GPUs), taken from and given back to
/// the thread's pool ([`take_pooled`]) when graphs are in use.
pub struct GraphCache {
    kv: KvCache,
    graphs: GraphSteps,
    pool: Option<PoolKey>,
}

impl GraphCache {
    /// A cache for the model identified by `model` (a weight tensor id): from the pool (with its
    /// graphs) or newly allocated by `alloc`; pooled again on drop when graphs are enabled.
    pub fn new(
        model: candle_core::TensorId,
        device: &Device,
        rows: usize,
        max_len: usize,
        alloc: impl FnOnce() -> Result<KvCache>,
    ) -> Result<Self> {
        if !graphs_enabled(device) {
            return Ok(Self {
                kv: alloc()?,
                graphs: GraphSteps::default(),
                pool: None,
            });
        }
        let key = PoolKey {
            model,
            rows,
            max_len,
        };
        let (kv, graphs) = match take_pooled(key) {
            Some(found) => found,
            None => (alloc()?, GraphSteps::default()),
        };
        Ok(Self {
            kv,
            graphs,
            pool: Some(key),
        })
    }

    /// The key/value buffers.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// The key/value buffers, mutably.
    pub fn kv_mut(&mut self) -> &mut KvCache {
        &mut self.kv
    }

    /// The cache, its drafting computations and whether they are captured, when the
    /// fixed-shape path is on (graphs enabled, or forced on this thread); `None` otherwise.
    pub fn fixed_drafting(
        &mut self,
    ) -> Option<(
        &mut KvCache,
        &mut Vec<super::draft_graph::StaticDrafting>,
        &mut Vec<super::dynamic_graph::DynamicDrafting>,
        bool,
    )> {
        let capture = self.fixed_mode()?;
        let g = &mut self.graphs;
        Some((&mut self.kv, &mut g.drafting, &mut g.dynamic, capture))
    }

    /// `Some(capture)` when the fixed-shape path is on: graphs enabled (capture, exactly when
    /// the cache came from and returns to the pool) or forced on this thread (eager).
    fn fixed_mode(&self) -> Option<bool> {
        let capture = self.pool.is_some();
        (capture || fixed_shape_forced()).then_some(capture)
    }

    /// Runs a step through the fixed-shape path when it applies (graphs enabled or forced, a
    /// prefix in the cache, a shape slot free, room for the staging block); `None` means: run
    /// the ordinary forward. `mask` is the additive mask `[rows, 1, s, len + s]`, or `None` for
    /// causal attention.
    pub fn try_fixed(
        &mut self,
        model: &dyn FixedForward,
        ids: &Tensor,
        features: Option<&Tensor>,
        pos: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let past = self.kv.len();
        let Some(capture) = self.fixed_mode().filter(|_| past > 0) else {
            return Ok(None);
        };
        let dev = model.fixed_device().clone();
        let (rows, s) = ids.dims2()?;
        let width = features.map(|f| f.dim(2)).transpose()?;
        let max_len = self.kv.max_len();
        let Some(g) = self
            .graphs
            .get(model, ids.dims(), pos.dims(), width, max_len, capture)?
        else {
            return Ok(None);
        };
        if !g.has_room(&self.kv) {
            return Ok(None);
        }
        let full = match mask {
            Some(m) => m.broadcast_as((rows, 1, s, past + s))?,
            None => crate::models::llamagen::causal_mask(s, past, &dev)?
                .reshape((1, 1, s, past + s))?
                .broadcast_as((rows, 1, s, past + s))?,
        };
        Ok(Some(g.forward(
            model,
            &mut self.kv,
            ids,
            features,
            pos,
            &full,
        )?))
    }
}

impl Drop for GraphCache {
    fn drop(&mut self) {
        if let Some(key) = self.pool.take() {
            let kv = std::mem::replace(&mut self.kv, KvCache::empty());
            return_pooled(key, kv, std::mem::take(&mut self.graphs));
        }
    }
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphCache")
            .field("kv", &self.kv)
            .field("graphs", &self.graphs)
            .field("pooled", &self.pool.is_some())
            .finish()
    }
}

impl super::model::DecodeCache for GraphCache {
    fn len(&self) -> usize {
        self.kv.len()
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        self.kv.truncate(len);
        Ok(())
    }

    fn keep(&mut self, start: usize, rows: &[Vec<usize>]) -> Result<()> {
        self.kv.keep_rows(start, rows)
    }

    fn defer_commit(&mut self, on: bool) {
        self.kv.defer_commit(on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::random::random_var_builder;
    use crate::bench::steps::StepPreset;
    use crate::models::llamagen::{
        caption_mask, causal_mask, key_padding_mask, AttnMask, Condition,
    };

    /// Pooled caches come back emptied and only for their own key; the pool stays bounded.
    #[test]
    fn pool_returns_caches_by_key() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::zeros(1, DType::F32, &dev)?;
        let key = |rows| PoolKey {
            model: t.id(),
            rows,
            max_len: 8,
        };
        let mut kv = KvCache::new(1, 2, 1, 8, 2, DType::F32, &dev)?;
        kv.advance(5);
        return_pooled(key(2), kv, GraphSteps::default());
        assert!(take_pooled(key(4)).is_none());
        let (kv, _) = take_pooled(key(2)).expect("pooled");
        assert_eq!((kv.len(), kv.batch()), (0, 2));
        assert!(take_pooled(key(2)).is_none());
        for r in 0..POOL_SIZE + 2 {
            return_pooled(
                key(r),
                KvCache::new(1, 1, 1, 8, 2, DType::F32, &dev)?,
                GraphSteps::default(),
            );
        }
        assert!(take_pooled(key(0)).is_none() && take_pooled(key(1)).is_none());
        assert!(take_pooled(key(POOL_SIZE + 1)).is_some());
        Ok(())
    }

    /// The fixed-shape step (eager here) reproduces the ordinary cached forward, for one token
    /// and for a block with a tree mask and per-row positions, with and without key padding,
    /// and leaves the cache usable by the ordinary path.
    #[test]
    fn fixed_step_matches_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = StepPreset::Tiny.target();
        let model = LlamaGen::load(random_var_builder(DType::F32, &dev), &cfg)?;
        let cls = cfg.cls_token_num;
        let cond = model.embed_condition(&Condition::Classes(vec![1, 2]))?;
        let prefix_pos = Tensor::arange(0u32, cls as u32, &dev)?;
        let max_len = cls + 12;
        for padded in [false, true] {
            // padding: row 0 may not see the condition position
            let valid = Tensor::new(&[[0f32], [1.]], &dev)?;
            let valid = padded.then_some(&valid);
            let mask = |s: usize, past: usize| -> Result<Tensor> {
                Ok(match valid {
                    Some(v) => caption_mask(v, s, past, &dev)?,
                    None => causal_mask(s, past, &dev)?
                        .unsqueeze(0)?
                        .unsqueeze(0)?
                        .repeat((2, 1, 1, 1))?,
                })
            };
            let mut a = model.new_cache(2, max_len)?;
            let mut b = model.new_cache(2, max_len)?;
            let m0 = AttnMask::Custom(mask(cls, 0)?);
            model.forward(&cond, &prefix_pos, &m0, &mut a)?;
            model.forward(&cond, &prefix_pos, &m0, &mut b)?;
            let mut steps = GraphSteps::default();
            for t in 0..4u32 {
                let ids = Tensor::new(&[[3 + t], [7 * t % 5]], &dev)?;
                let past = a.len();
                let p = Tensor::new(&[past as u32], &dev)?;
                let m = mask(1, past)?;
                let x = model.embed_tokens(&ids)?;
                let want = model.forward(&x, &p, &AttnMask::Custom(m.clone()), &mut a)?;
                let g = steps
                    .get(&model, ids.dims(), p.dims(), None, max_len, true)?
                    .expect("room for the shape");
                let got = g.forward(&model, &mut b, &ids, None, &p, &m)?;
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "padded {padded}, step {t}: {diff}");
            }
            // a 3-token tree block (root, two children) with per-row positions
            let past = a.len() as u32;
            let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &dev)?;
            let row = [past, past + 1, past + 1];
            let p = Tensor::new(&[row, row], &dev)?;
            let past = past as usize;
            let tree: Vec<f32> = (0..3)
                .flat_map(|i| {
                    (0..past + 3).map(move |j| {
                        if j <= past || j == past + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let m = Tensor::from_vec(tree, (1, 1, 3, past + 3), &dev)?.repeat((2, 1, 1, 1))?;
            let m = match valid {
                Some(v) => m.broadcast_add(&key_padding_mask(v, past + 3)?)?,
                None => m,
            };
            let x = model.embed_tokens(&ids)?;
            let want = model.forward(&x, &p, &AttnMask::Custom(m.clone()), &mut a)?;
            let g = steps
                .get(&model, ids.dims(), p.dims(), None, max_len, true)?
                .expect("room for the shape");
            let got = g.forward(&model, &mut b, &ids, None, &p, &m)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "padded {padded}, tree block: {diff}");
            assert_eq!(steps.counts(), (2, 0));
            // the ordinary path continues on the same cache
            assert_eq!(a.len(), b.len());
            let x = model.embed_tokens(&Tensor::new(&[[1u32], [2]], &dev)?)?;
            let p = Tensor::new(&[a.len() as u32], &dev)?;
            let m = AttnMask::Custom(mask(1, a.len())?);
            let ha = model.forward(&x, &p, &m, &mut a)?;
            let hb = model.forward(&x, &p, &m, &mut b)?;
            let diff = (ha - hb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{diff}");
        }
        Ok(())
    }
}
