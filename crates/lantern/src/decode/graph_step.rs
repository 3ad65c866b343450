//! The one-token decode step as a fixed-shape computation, replayed as a CUDA graph on GPUs.
//!
//! A decode step of a 0.8B model at batch 2 is launch-bound: ~1000 small kernels, each costing
//! more host time than GPU time. Capturing the step once and replaying it removes the host
//! cost, but a graph replays the same kernels with the same arguments, so everything that
//! changes from step to step lives in device buffers that are overwritten in place before each
//! launch: the token ids, the RoPE position, the cache slot the new K/V go to (the cache's
//! write-slot mode, [`KvCache::set_write_slots`]) and an additive mask over *all* cache slots
//! (which also carries t2i caption padding). Attention then always spans the whole cache
//! capacity; the masked slots cost a little compute, no launches.
//!
//! On the CPU (and wherever capture is not available) the same fixed-shape step runs eagerly,
//! which is how the tests check it against the ordinary forward.
use crate::cache::KvCache;
use crate::models::llamagen::{LlamaGen, PAD_NEG};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// A captured (or eager) one-token step of [`LlamaGen`] over one [`KvCache`].
pub struct GraphStep {
    ids: Tensor,
    pos: Tensor,
    mask: Tensor,
    logits: Tensor,
    /// Key padding per row for the first `pad.len() / rows` slots (t2i captions).
    pad: Vec<f32>,
    rows: usize,
    max_len: usize,
    #[cfg(feature = "cuda")]
    graph: Option<candle_core::cuda_backend::cudarc::driver::CudaGraph>,
}

impl GraphStep {
    /// Puts `cache` (already holding the prefix) into its write-slot mode and prepares the
    /// step; on a CUDA device with `capture`, records it as a graph (one eager warm-up run
    /// first, which writes nothing that the next real step does not overwrite).
    ///
    /// `caption_valid` (`[rows, n_cap]`, 1 = valid) adds t2i key padding to the mask.
    pub fn new(
        model: &LlamaGen,
        cache: &mut KvCache,
        caption_valid: Option<&Tensor>,
        capture: bool,
    ) -> Result<Self> {
        let dev = model.device().clone();
        let rows = cache.batch();
        let max_len = cache.max_len();
        let pad = match caption_valid {
            Some(v) => v
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .into_iter()
                .flatten()
                .map(|x| if x > 0.5 { 0.0 } else { PAD_NEG })
                .collect(),
            None => Vec::new(),
        };
        if !pad.is_empty() && pad.len() % rows != 0 {
            return Err(Error::invalid(
                "caption mask",
                format!("{} entries for {rows} rows (internal error)", pad.len()),
            ));
        }
        let slot = Tensor::zeros(1, DType::U32, &dev)?;
        cache.set_write_slots(Some(&slot))?;
        let mut step = Self {
            ids: Tensor::zeros((rows, 1), DType::U32, &dev)?,
            pos: Tensor::zeros(1, DType::U32, &dev)?,
            mask: Tensor::zeros((rows, 1, 1, max_len), DType::F32, &dev)?,
            logits: Tensor::zeros((rows, 1, model.config().vocab_size), DType::F32, &dev)?,
            pad,
            rows,
            max_len,
            #[cfg(feature = "cuda")]
            graph: None,
        };
        if capture {
            step.capture(model, cache)?;
        }
        Ok(step)
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

    /// The fixed-shape computation: reads the input buffers, writes K/V at the slot and the
    /// logits into the output buffer. Every temporary is dropped before it returns (so that a
    /// captured graph frees what it allocates).
    fn run(&self, model: &LlamaGen, cache: &mut KvCache) -> Result<()> {
        let x = model.embed_tokens(&self.ids)?;
        let h = model.forward_fixed(&x, &self.pos, &self.mask, cache)?;
        let l = model.lm_head(&h)?;
        self.logits.slice_set(&l, 0, 0)?;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn capture(&mut self, model: &LlamaGen, cache: &mut KvCache) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Device::Cuda(cuda) = model.device() else {
            return Ok(());
        };
        let debug = std::env::var("LANTERN_GRAPH_DEBUG").is_ok();
        let say = |what: &str| {
            if debug {
                eprintln!("[graph] {what}");
            }
        };
        // candle uploads the dims/strides of every strided op from host memory; with this
        // guard the warm-up caches those uploads on the device and the capture reuses them (a
        // captured upload would read freed host memory on replay)
        let _htod_cache = cuda.enable_cuda_graph_htod_cache();
        // warm-up: also loads every kernel module and the cuBLAS workspace outside the capture
        say("warm-up run");
        self.run(model, cache)?;
        model.device().synchronize()?;
        let stream = cuda.cuda_stream();
        let wrap = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            Error::invalid(
                "CUDA graph",
                format!("{e:?}; run with LANTERN_CUDA_GRAPHS=0"),
            )
        };
        let mode = match std::env::var("LANTERN_GRAPH_MODE").as_deref() {
            Ok("global") => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
            Ok("thread") => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            _ => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        };
        let flags = if std::env::var("LANTERN_GRAPH_AUTOFREE").as_deref() == Ok("0") {
            sys::CUgraphInstantiate_flags(0)
        } else {
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH
        };
        say(&format!("begin capture {mode:?}, flags {flags:?}"));
        stream.begin_capture(mode).map_err(wrap)?;
        say("capturing");
        let ran = self.run(model, cache);
        say(&format!("captured run: {:?}", ran.as_ref().err()));
        let graph = stream.end_capture(flags).map_err(wrap);
        say(&format!("end capture: {:?}", graph.as_ref().map(|g| g.is_some())));
        let graph = graph?;
        ran?;
        if let Some(g) = &graph {
            g.upload().map_err(wrap)?;
            say("uploaded");
        }
        self.graph = graph;
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn capture(&mut self, _model: &LlamaGen, _cache: &mut KvCache) -> Result<()> {
        Ok(())
    }

    /// One step: tokens `ids` `[rows, 1]` u32 at RoPE row `pos` `[1]` u32 (device tensors),
    /// written to cache slot `cache.len()` (the cache must hold its prefix in slots `0..len`);
    /// returns the f32 logits `[rows, 1, vocab]` (a view of the output buffer: read it before
    /// the next step) and advances the cache length by one.
    pub fn step(
        &mut self,
        model: &LlamaGen,
        cache: &mut KvCache,
        ids: &Tensor,
        pos: &Tensor,
    ) -> Result<Tensor> {
        let dev = self.ids.device().clone();
        let slot = cache.len();
        if ids.dims() != [self.rows, 1] || pos.dims() != [1] || slot >= self.max_len {
            return Err(Error::invalid(
                "decode step",
                format!(
                    "ids {:?} / position {:?} for {} rows at slot {slot} of {} (internal error)",
                    ids.dims(),
                    pos.dims(),
                    self.rows,
                    self.max_len
                ),
            ));
        }
        let idx = cache
            .write_slots()
            .ok_or_else(|| Error::invalid("KV cache", "not in write-slot mode (internal error)"))?;
        idx.slice_set(
            &Tensor::from_vec(vec![slot as u32; idx.elem_count()], idx.dims(), &dev)?,
            0,
            0,
        )?;
        self.ids.slice_set(&ids.to_dtype(DType::U32)?, 0, 0)?;
        self.pos.slice_set(&pos.to_dtype(DType::U32)?, 0, 0)?;
        let n_pad = self.pad.len() / self.rows.max(1);
        let mut mask = vec![f32::NEG_INFINITY; self.rows * self.max_len];
        for (r, row) in mask.chunks_mut(self.max_len).enumerate() {
            row[..=slot].iter_mut().for_each(|x| *x = 0.0);
            let n = n_pad.min(slot + 1);
            row[..n].copy_from_slice(&self.pad[r * n_pad..r * n_pad + n]);
        }
        self.mask.slice_set(
            &Tensor::from_vec(mask, (self.rows, 1, 1, self.max_len), &dev)?,
            0,
            0,
        )?;
        self.launch(model, cache)?;
        cache.advance(1);
        Ok(self.logits.clone())
    }

    #[cfg(feature = "cuda")]
    fn launch(&self, model: &LlamaGen, cache: &mut KvCache) -> Result<()> {
        match &self.graph {
            Some(g) => g.launch().map_err(|e| {
                Error::invalid(
                    "CUDA graph",
                    format!("{e:?}; run with LANTERN_CUDA_GRAPHS=0"),
                )
            }),
            None => self.run(model, cache),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn launch(&self, model: &LlamaGen, cache: &mut KvCache) -> Result<()> {
        self.run(model, cache)
    }
}

/// Whether decoding loops should capture CUDA graphs on `device` (CUDA, unless the environment
/// sets `LANTERN_CUDA_GRAPHS=0`).
pub fn graphs_enabled(device: &Device) -> bool {
    device.is_cuda() && std::env::var("LANTERN_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::random::random_var_builder;
    use crate::bench::steps::StepPreset;
    use crate::models::llamagen::{caption_mask, AttnMask, Condition};

    /// The fixed-shape step (eager here) reproduces the ordinary cached forward token by
    /// token, with and without key padding, and leaves the cache usable by the ordinary path.
    #[test]
    fn fixed_step_matches_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = StepPreset::Tiny.target();
        let model = LlamaGen::load(random_var_builder(DType::F32, &dev), &cfg)?;
        let cls = cfg.cls_token_num;
        let cond = model.embed_condition(&Condition::Classes(vec![1, 2]))?;
        let prefix_pos = Tensor::arange(0u32, cls as u32, &dev)?;
        for padded in [false, true] {
            // padding: row 0 may not see the condition position
            let valid = Tensor::new(&[[0f32], [1.]], &dev)?;
            let valid = padded.then_some(&valid);
            let mask = |s: usize, past: usize| -> Result<AttnMask> {
                Ok(match valid {
                    Some(v) => AttnMask::Custom(caption_mask(v, s, past, &dev)?),
                    None => AttnMask::Causal,
                })
            };
            let mut a = model.new_cache(2, cls + 8)?;
            let mut b = model.new_cache(2, cls + 8)?;
            model.forward(&cond, &prefix_pos, &mask(cls, 0)?, &mut a)?;
            model.forward(&cond, &prefix_pos, &mask(cls, 0)?, &mut b)?;
            let mut step = GraphStep::new(&model, &mut b, valid, true)?;
            assert!(!step.is_captured());
            for t in 0..5u32 {
                let ids = [3 + t, 7 * t % 5];
                let pos = cls as u32 + t;
                let ids_t = Tensor::new(&[[ids[0]], [ids[1]]], &dev)?;
                let x = model.embed_tokens(&ids_t)?;
                let past = a.len();
                let p = Tensor::new(&[pos], &dev)?;
                let h = model.forward(&x, &p, &mask(1, past)?, &mut a)?;
                let want = model.lm_head(&h)?;
                let got = step.step(&model, &mut b, &ids_t, &p)?;
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "padded {padded}, step {t}: {diff}");
            }
            assert_eq!(a.len(), b.len());
            b.set_write_slots(None)?;
            let x = model.embed_tokens(&Tensor::new(&[[1u32], [2]], &dev)?)?;
            let p = Tensor::new(&[(cls + 5) as u32], &dev)?;
            let past = a.len();
            let ha = model.forward(&x, &p, &mask(1, past)?, &mut a)?;
            let hb = model.forward(&x, &p, &mask(1, past)?, &mut b)?;
            let diff = (ha - hb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{diff}");
        }
        Ok(())
    }
}
