//! LlamaGen GPT (Sun et al. 2024, "Autoregressive Model Beats Diffusion"), class- and
//! text-conditional, as in `autoregressive/models/gpt.py` of FoundationVision/LlamaGen and the
//! HF-style variant of LANTERN (spec §1). Canonical tensor names are the original ones
//! (`layers.i.attention.wqkv.weight`, ...); [`crate::load`] maps HF checkpoints onto them.
pub mod attention;
pub mod cond;
pub mod config;
pub mod rope;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};

pub use attention::{caption_mask, causal_mask, key_padding_mask, AttnMask, PAD_NEG};
pub use cond::{CondEmbedder, CAPTION_LEN};
pub use config::{Config, ModelType};
use rope::Rope;

use crate::cache::KvCache;

/// The condition of a batch of images.
#[derive(Clone, Debug)]
pub enum Condition {
    /// Class ids, one per image; the null class is `num_classes`.
    Classes(Vec<u32>),
    /// T5 caption features `[b, 120, caption_dim]` (left-padded, padded rows zero; the null
    /// caption comes from [`LlamaGen::uncond_caption`]) and their mask `[b, 120]` (1 = valid),
    /// which the caller turns into an attention mask with [`caption_mask`].
    Captions { features: Tensor, mask: Tensor },
}

/// RMSNorm as LlamaGen computes it: normalise in f32, cast back, then scale by the weight.
///
/// Inference (no gradient tracking) uses candle's fused kernel: one launch for f32 models; for
/// f16/bf16 the kernel normalises in f32 and rounds once (scale 1), then the weight multiplies
/// in the model dtype, exactly LlamaGen's `_norm(x.float()).type_as(x) * weight`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    /// Ones `[dim]` in the weight's dtype (scale of the fused normalisation).
    ones: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` `[dim]` under `vb` (initialised to ones when training from scratch).
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let ones = Tensor::ones(dim, weight.dtype(), weight.device())?;
        Ok(Self { weight, ones, eps })
    }

    /// The reference path of several ops (also used while training: it has gradients).
    fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf
            .broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .to_dtype(x.dtype())?;
        y.broadcast_mul(&self.weight)
    }
}

impl RmsNorm {
    /// `h = x + residual` and the norm of `h`, in one kernel on the fused path.
    pub fn add_forward(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.fused_ok(x) && !residual.track_op() {
            return crate::fused::add_rms_norm(x, residual, &self.weight, self.eps as f32);
        }
        let h = (x + residual)?;
        let n = self.forward(&h)?;
        Ok((h, n))
    }

    /// `h = x lin.wᵀ + residual` (with `swiglu`, `x` holds gate/up rows and the projection
    /// takes `silu(gate) * up`) and the norm of `h`: on the fused path the projection's sum
    /// over k is split into slices that the norm sums ([`crate::fused::linear_add_rms_norm`]).
    pub fn add_linear_forward(
        &self,
        x: &Tensor,
        lin: &Linear,
        swiglu: bool,
        residual: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.fused_ok(x) && !residual.track_op() {
            let eps = self.eps as f32;
            return crate::fused::linear_add_rms_norm(x, lin, swiglu, residual, &self.weight, eps);
        }
        let x = if swiglu {
            let f = x.dim(D::Minus1)? / 2;
            (candle_nn::ops::silu(&x.narrow(D::Minus1, 0, f)?)? * x.narrow(D::Minus1, f, f)?)?
        } else {
            x.clone()
        };
        self.add_forward(&lin.forward(&x)?, residual)
    }

    fn fused_ok(&self, x: &Tensor) -> bool {
        crate::fused::active(x) && !self.weight.track_op() && x.dtype() == self.weight.dtype()
    }

    /// The weight and eps, for kernels that normalise their input themselves.
    fn parts(&self) -> (&Tensor, f32) {
        (&self.weight, self.eps as f32)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() || x.dtype() != self.weight.dtype() {
            return self.forward_ops(x);
        }
        if self.fused_ok(x) {
            return crate::fused::rms_norm(x, &self.weight, self.eps as f32);
        }
        let x = x.contiguous()?;
        let eps = self.eps as f32;
        if x.dtype() == DType::F32 {
            candle_nn::ops::rms_norm(&x, &self.weight, eps)
        } else {
            candle_nn::ops::rms_norm(&x, &self.ones, eps)?.broadcast_mul(&self.weight)
        }
    }
}

/// SwiGLU feed-forward `w2(silu(w1 x) * w3 x)`.
///
/// Loaded (not trained) weights keep `w1` and `w3` as one `[2 * hidden, dim]` matrix, with
/// `w1`/`w3` views into it, so that the fused path runs one projection and one `silu * up`
/// kernel.
#[derive(Clone, Debug)]
pub struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
    w13: Option<Linear>,
}

impl FeedForward {
    /// Loads `w1`, `w2`, `w3` under `vb`.
    pub fn load(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Self::from_parts(
            linear_no_bias(dim, hidden, vb.pp("w1"))?,
            linear_no_bias(hidden, dim, vb.pp("w2"))?,
            linear_no_bias(dim, hidden, vb.pp("w3"))?,
        )
    }

    /// Builds the block from loaded projections (gate, down, up).
    pub fn from_parts(w1: Linear, w2: Linear, w3: Linear) -> Result<Self> {
        let (g, u) = (w1.weight(), w3.weight());
        if g.is_variable() || u.is_variable() || g.dims() != u.dims() {
            return Ok(Self {
                w1,
                w2,
                w3,
                w13: None,
            });
        }
        let f = g.dim(0)?;
        let w13 = Tensor::cat(&[g, u], 0)?;
        Ok(Self {
            w1: Linear::new(w13.narrow(0, 0, f)?, None),
            w2,
            w3: Linear::new(w13.narrow(0, f, f)?, None),
            w13: Some(Linear::new(w13, None)),
        })
    }
}

impl FeedForward {
    /// `[w1 | w3]` when the weights were loaded (not trained).
    fn gate_up(&self) -> Option<&Tensor> {
        self.w13.as_ref().map(|l| l.weight())
    }

    /// On the fused path (`x` served by the fused kernels, weights loaded), the gate/up rows
    /// `[.., 2 hidden]` of `x` and `w2`, for a caller that fuses `w2` with what follows; else
    /// `None`.
    pub(crate) fn gate_up_rows(&self, x: &Tensor) -> Result<Option<(Tensor, &Linear)>> {
        match self.w13.as_ref().filter(|_| crate::fused::active(x)) {
            Some(w13) => Ok(Some((crate::fused::linear(w13, x)?, &self.w2))),
            None => Ok(None),
        }
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w13) = self.w13.as_ref().filter(|_| crate::fused::active(x)) {
            let m = crate::fused::silu_mul(&crate::fused::linear(w13, x)?)?;
            return crate::fused::linear(&self.w2, &m);
        }
        let g = candle_nn::ops::silu(&self.w1.forward(x)?)?;
        self.w2.forward(&(g * self.w3.forward(x)?)?)
    }
}

#[derive(Clone, Debug)]
struct Block {
    attention: attention::Attention,
    feed_forward: FeedForward,
    attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            attention: attention::Attention::load(
                vb.pp("attention"),
                cfg.dim,
                cfg.n_head,
                cfg.n_kv_head,
            )?,
            feed_forward: FeedForward::load(vb.pp("feed_forward"), cfg.dim, cfg.ffn_hidden)?,
            attention_norm: RmsNorm::load(vb.pp("attention_norm"), cfg.dim, cfg.norm_eps)?,
            ffn_norm: RmsNorm::load(vb.pp("ffn_norm"), cfg.dim, cfg.norm_eps)?,
        })
    }
}

impl Block {
    /// Whether the few-row kernels serve this block for `rows` rows of hidden state `h`.
    fn small_ok(&self, h: &Tensor, rows: usize) -> bool {
        let d = h.dim(D::Minus1).unwrap_or(0);
        let f = self.feed_forward.w2.weight().dim(1).unwrap_or(0);
        self.attention.fused_ok(h)
            && self.feed_forward.gate_up().is_some()
            && crate::fused::small_linear_fits(rows, d, h.dtype())
            && crate::fused::small_linear_fits(rows, f, h.dtype())
    }

    /// A decode step of the block in five weight-streaming kernels plus two for attention:
    /// `wqkv` with the attention norm first, K/V write (inside the `wqkv` kernel unless
    /// `LANTERN_FUSED_KV=0`), attention, `wo` with the residual add,
    /// `[w1 | w3]` with the FFN norm first and SwiGLU after, `w2` with the residual add.
    /// On CUDA with `LANTERN_DECODE_LAYER=1`, a decode step (one token per row) runs the whole
    /// block as one kernel ([`crate::fused::decode_layer`]).
    fn forward_small(
        &self,
        h: &Tensor,
        rope: &rope::RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &KvCache,
    ) -> Result<Tensor> {
        use crate::fused::{small_linear, Epilogue};
        let att = &self.attention;
        if let Some(gate_up) = self
            .feed_forward
            .gate_up()
            .filter(|_| crate::fused::decode_layer_enabled())
        {
            let ffn = self.feed_forward.w2.weight().dim(1)?;
            if crate::fused::decode_layer_fits(h, att.heads(), ffn) {
                let (attn_norm, eps) = self.attention_norm.parts();
                let weights = crate::fused::BlockWeights {
                    wqkv: att.wqkv_weight(),
                    attn_norm,
                    wo: att.wo_weight(),
                    ffn_norm: self.ffn_norm.parts().0,
                    w13: gate_up,
                    w2: self.feed_forward.w2.weight(),
                    eps,
                };
                return att.decode_layer(h, &weights, rope, mask, layer, cache);
            }
        }
        let a = if crate::fused::fused_kv_enabled() && h.dim(1)? == 1 {
            att.attend_small_kv(h, self.attention_norm.parts(), rope, mask, layer, cache)?
        } else {
            let qkv = small_linear(
                h,
                att.wqkv_weight(),
                Some(self.attention_norm.parts()),
                Epilogue::None,
            )?;
            att.attend_fused(&qkv, rope, mask, layer, cache)?
        };
        let h = small_linear(&a, att.wo_weight(), None, Epilogue::Residual(h))?;
        let gate_up = self.feed_forward.gate_up().expect("checked by small_ok");
        let m = small_linear(&h, gate_up, Some(self.ffn_norm.parts()), Epilogue::SwiGlu)?;
        small_linear(
            &m,
            self.feed_forward.w2.weight(),
            None,
            Epilogue::Residual(&h),
        )
    }
}

/// The LlamaGen transformer; holds weights and the RoPE table only (no per-request state).
#[derive(Clone, Debug)]
pub struct LlamaGen {
    cfg: Config,
    tok_embeddings: Embedding,
    cls_embedding: CondEmbedder,
    layers: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl LlamaGen {
    /// Loads all weights under original names (`tok_embeddings`, `cls_embedding`, `layers.i`,
    /// `norm`, `output`); the same call serves checkpoints and a training `VarMap`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let layers = (0..cfg.n_layer)
            .map(|i| Block::load(vb.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.grid_side(),
            cfg.rope_base,
            cfg.cls_token_num,
            cfg.extra_rope_rows,
            vb.device(),
        )?;
        Ok(Self {
            tok_embeddings: embedding(cfg.vocab_size, cfg.dim, vb.pp("tok_embeddings"))?,
            cls_embedding: CondEmbedder::load(vb.pp("cls_embedding"), cfg)?,
            layers,
            norm: RmsNorm::load(vb.pp("norm"), cfg.dim, cfg.norm_eps)?,
            output: linear_no_bias(cfg.dim, cfg.vocab_size, vb.pp("output"))?,
            rope,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
        })
    }

    /// Every tensor `load` reads, with its shape (original names).
    pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
        let (d, f, hd) = (cfg.dim, cfg.ffn_hidden, cfg.head_dim());
        let mut v = vec![
            ("tok_embeddings.weight".to_string(), vec![cfg.vocab_size, d]),
            ("norm.weight".to_string(), vec![d]),
            ("output.weight".to_string(), vec![cfg.vocab_size, d]),
        ];
        match cfg.model_type {
            ModelType::C2i => v.push((
                "cls_embedding.embedding_table.weight".into(),
                vec![cfg.class_rows(), d],
            )),
            ModelType::T2i => {
                v.push((
                    "cls_embedding.cap_proj.fc1.weight".into(),
                    vec![d, cfg.caption_dim],
                ));
                v.push(("cls_embedding.cap_proj.fc2.weight".into(), vec![d, d]));
                v.push((
                    "cls_embedding.uncond_embedding".into(),
                    vec![CAPTION_LEN, cfg.caption_dim],
                ));
            }
        }
        for i in 0..cfg.n_layer {
            let p = format!("layers.{i}.");
            let qkv = (cfg.n_head + 2 * cfg.n_kv_head) * hd;
            v.push((p.clone() + "attention.wqkv.weight", vec![qkv, d]));
            v.push((p.clone() + "attention.wo.weight", vec![d, cfg.n_head * hd]));
            v.push((p.clone() + "feed_forward.w1.weight", vec![f, d]));
            v.push((p.clone() + "feed_forward.w3.weight", vec![f, d]));
            v.push((p.clone() + "feed_forward.w2.weight", vec![d, f]));
            v.push((p.clone() + "attention_norm.weight", vec![d]));
            v.push((p + "ffn_norm.weight", vec![d]));
        }
        v
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Id of the token embedding tensor: identifies these weights (clones share it), e.g. to
    /// reuse caches whose CUDA graphs point at them.
    pub fn embeddings_id(&self) -> candle_core::TensorId {
        self.tok_embeddings.embeddings().id()
    }

    /// Weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Condition embeddings for the first `cls_token_num` positions.
    ///
    /// # Shapes
    /// - returns `[b, cls_token_num, dim]` (b = number of classes / caption rows)
    pub fn embed_condition(&self, cond: &Condition) -> crate::Result<Tensor> {
        let e = match cond {
            Condition::Classes(ids) => self.cls_embedding.classes(ids)?,
            Condition::Captions { features, .. } => {
                let (_, n, c) = features.dims3()?;
                if n < self.cfg.cls_token_num || c != self.cfg.caption_dim {
                    return Err(crate::Error::invalid(
                        "caption features",
                        format!(
                            "shape {:?} needs at least {} rows of width {}; pass T5 features [b, 120, {}]",
                            features.dims(),
                            self.cfg.cls_token_num,
                            self.cfg.caption_dim,
                            self.cfg.caption_dim
                        ),
                    ));
                }
                self.cls_embedding.captions(features)?
            }
        };
        let e = e.narrow(1, 0, self.cfg.cls_token_num.min(e.dim(1)?))?;
        Ok(e.to_dtype(self.dtype)?)
    }

    /// The null caption features `[b, 120, caption_dim]` for the unconditional CFG half (t2i).
    pub fn uncond_caption(&self, b: usize) -> crate::Result<Tensor> {
        Ok(self.cls_embedding.uncond_caption(b)?)
    }

    /// Token embeddings.
    ///
    /// # Shapes
    /// - `ids`: `[b, s]` u32 → `[b, s, dim]`
    pub fn embed_tokens(&self, ids: &Tensor) -> crate::Result<Tensor> {
        Ok(self.tok_embeddings.forward(&ids.to_dtype(DType::U32)?)?)
    }

    /// Runs the blocks on input embeddings at RoPE rows `positions`, attending to the cache
    /// contents and to `x` itself under `mask`, and appends the new K/V to `cache`.
    ///
    /// # Shapes
    /// - `x`: `[b, s, dim]`; `positions`: `[s]` or `[b, s]` u32 → post-final-norm hidden `[b, s, dim]`
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        cache: &mut KvCache,
    ) -> crate::Result<Tensor> {
        if cache.n_layer() != self.layers.len() {
            return Err(crate::Error::invalid(
                "KV cache",
                format!(
                    "has {} layers, the model {}; create it with LlamaGen::new_cache",
                    cache.n_layer(),
                    self.layers.len()
                ),
            ));
        }
        let h = self.run_blocks(x, positions, mask, Some(&mut *cache), true)?;
        cache.advance(x.dim(1)?);
        Ok(h)
    }

    /// The fixed-shape step that CUDA graphs capture: `cache` must be in its staging mode
    /// ([`KvCache::set_staging`]), `mask` covers all `max_len` cache slots, and nothing is
    /// read back to the host (positions are not range-checked: keep them below the RoPE table).
    ///
    /// # Shapes
    /// - as [`LlamaGen::forward`]; `mask`: `[b, 1, s, max_len]`
    pub fn forward_fixed(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> crate::Result<Tensor> {
        if cache.staging().is_none() {
            return Err(crate::Error::invalid(
                "KV cache",
                "forward_fixed needs the staging mode (KvCache::set_staging)",
            ));
        }
        let mask = AttnMask::Custom(mask.clone());
        Ok(self.run_blocks(x, positions, &mask, Some(cache), false)?)
    }

    fn run_blocks(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        mut cache: Option<&mut KvCache>,
        check_positions: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let rows = if check_positions {
            self.rope.select(positions, b, s)?
        } else {
            self.rope.select_unchecked(positions, b, s)?
        };
        let h = x.to_dtype(self.dtype)?;
        let Some(first) = self.layers.first() else {
            return self.norm.forward(&h);
        };
        if let Some(c) = cache.as_deref() {
            if first.small_ok(&h, b * s) {
                let mut h = h;
                for (i, layer) in self.layers.iter().enumerate() {
                    h = layer.forward_small(&h, &rows, mask, i, c)?;
                }
                return self.norm.forward(&h);
            }
        }
        // each norm also adds the residual before it (one kernel on the fused path)
        let mut n = first.attention_norm.forward(&h)?;
        let mut h = h;
        // on the fused path `wo` and `w2` run fused with the norm after them
        for (i, layer) in self.layers.iter().enumerate() {
            let att = &layer.attention;
            let before_wo = match cache.as_deref() {
                Some(c) => att.attend_before_wo(&n, &rows, mask, i, c)?,
                None => None,
            };
            (h, n) = match before_wo {
                Some(o) => layer.ffn_norm.add_linear_forward(&o, att.wo(), false, &h)?,
                None => {
                    let a = att.forward(&n, &rows, mask, i, cache.as_deref_mut())?;
                    layer.ffn_norm.add_forward(&h, &a)?
                }
            };
            let next = match self.layers.get(i + 1) {
                Some(l) => &l.attention_norm,
                None => &self.norm,
            };
            (h, n) = match layer.feed_forward.gate_up_rows(&n)? {
                Some((gu, w2)) => next.add_linear_forward(&gu, w2, true, &h)?,
                None => next.add_forward(&h, &layer.feed_forward.forward(&n)?)?,
            };
        }
        Ok(n)
    }

    /// Id of the output head's weight tensor (shared by clones).
    pub fn lm_head_id(&self) -> candle_core::TensorId {
        self.output.weight().id()
    }

    /// Output projection, computed in the model dtype and returned as f32.
    ///
    /// # Shapes
    /// - `hidden`: `[b, s, dim]` → logits `[b, s, vocab]` f32
    pub fn lm_head(&self, hidden: &Tensor) -> crate::Result<Tensor> {
        Ok(self.lm_head_raw(hidden)?.to_dtype(DType::F32)?)
    }

    /// [`Self::lm_head`] before its cast: logits `[b, s, vocab]` in the model dtype.
    pub fn lm_head_raw(&self, hidden: &Tensor) -> crate::Result<Tensor> {
        Ok(crate::fused::linear(
            &self.output,
            &hidden.to_dtype(self.dtype)?,
        )?)
    }

    /// Full teacher-forced forward without a cache (training, feature extraction): condition
    /// embeddings followed by the token embeddings at positions `0..cls + n`, causal mask, or
    /// `mask` instead when given (e.g. [`caption_mask`] with `past = 0`).
    ///
    /// # Shapes
    /// - `cond`: `[b, cls_token_num, dim]`; `tokens`: `[b, n]` u32 → (hidden, logits f32)
    ///   `[b, cls + n, dim]`, `[b, cls + n, vocab]`
    pub fn forward_train(
        &self,
        cond: &Tensor,
        tokens: &Tensor,
        mask: Option<&Tensor>,
    ) -> crate::Result<(Tensor, Tensor)> {
        let x = Tensor::cat(&[cond.to_dtype(self.dtype)?, self.embed_tokens(tokens)?], 1)?;
        let s = x.dim(1)?;
        let pos = Tensor::arange(0u32, s as u32, &self.device)?;
        let mask = match mask {
            Some(m) => AttnMask::Custom(m.clone()),
            None => AttnMask::Causal,
        };
        let h = self.run_blocks(&x, &pos, &mask, None, true)?;
        let logits = self.lm_head(&h)?;
        Ok((h, logits))
    }

    /// A cache for `batch` sequences of up to `max_len` positions in the model dtype.
    pub fn new_cache(&self, batch: usize, max_len: usize) -> crate::Result<KvCache> {
        KvCache::new(
            self.cfg.n_layer,
            batch,
            self.cfg.n_kv_head,
            max_len,
            self.cfg.head_dim(),
            self.dtype,
            &self.device,
        )
    }

    /// Cache length that covers the condition, all image tokens and a verification block of
    /// `extra` positions, rounded up to a multiple of 8.
    pub fn cache_len(&self, extra: usize) -> usize {
        config::find_multiple(self.cfg.cls_token_num + self.cfg.block_size + extra, 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// The fused inference norm equals the op-by-op reference (f32 exactly up to rsqrt
    /// rounding; bf16 within one rounding step).
    #[test]
    fn fused_rms_norm_equals_reference() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let w = (Tensor::randn(0f32, 1.0, 64, &dev)? + 1.0)?.to_dtype(dtype)?;
            let ones = Tensor::ones(64, dtype, &dev)?;
            let norm = RmsNorm {
                weight: w,
                ones,
                eps: 1e-5,
            };
            let x = Tensor::randn(0f32, 3.0, (2, 5, 64), &dev)?.to_dtype(dtype)?;
            let got = norm.forward(&x)?.to_dtype(DType::F32)?;
            let want = norm.forward_ops(&x)?.to_dtype(DType::F32)?;
            let rel = ((&got - &want)?.abs()? / (want.abs()? + 1e-3)?)?
                .max_all()?
                .to_scalar::<f32>()?;
            // bf16: a one-ulp (2^-7 relative) difference before the weight product can survive it
            let tol = if dtype == DType::F32 { 1e-6 } else { 2e-2 };
            assert!(rel < tol, "{dtype:?}: {rel}");
        }
        // while training the weight is a variable: the reference path (with gradients) runs
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let norm = RmsNorm::load(vb, 8, 1e-5)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 8), &dev)?;
        let y = norm.forward(&x)?;
        assert!(y.track_op());
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&norm.weight).is_some());
        Ok(())
    }
}
