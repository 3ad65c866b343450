//! Multi-head attention with an explicit additive mask (the HF/LANTERN reference path, spec
//! §1.7): `scores = q·kᵀ / sqrt(head_dim)` in the model dtype, `+ mask` and softmax in f32,
//! probabilities cast back, `· v`. Also the mask builders the decoding loops use.
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use super::rope::RopeRows;
use crate::cache::KvCache;

/// Finite large negative value for caption keys masked by padding. A padded query whose
/// allowed keys are all padded then attends uniformly to them, as the HF variant does.
pub const PAD_NEG: f32 = -1e30;

/// Attention mask of one forward pass.
#[derive(Clone, Debug)]
pub enum AttnMask {
    /// Causal over `past + s` keys (query `i` sees keys `0..=past+i`); no mask for `s == 1`.
    Causal,
    /// Additive f32 mask (0 or -inf) `[s, past + s]` or `[b, 1, s, past + s]` (`max_len` keys
    /// instead of `past + s` when the cache is in its fixed-shape mode).
    Custom(Tensor),
}

/// Causal additive f32 mask `[s, past + s]` for `s` queries after `past` cached positions.
pub fn causal_mask(s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let t = past + s;
    let data: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (s, t), device)
}

/// Key-padding mask `[b, 1, 1, total]`: [`PAD_NEG`] at caption keys whose `valid` entry is 0.
///
/// # Shapes
/// - `valid`: `[b, n_cap]` (any dtype, 1 = valid); `total >= n_cap` keys in all
pub fn key_padding_mask(valid: &Tensor, total: usize) -> Result<Tensor> {
    let (b, n) = valid.dims2()?;
    if n > total {
        candle_core::bail!("caption mask has {n} columns but only {total} keys");
    }
    let v = valid.to_dtype(DType::F32)?;
    let pad = ((v.ones_like()? - v)? * PAD_NEG as f64)?;
    let pad = if total > n {
        Tensor::cat(
            &[
                pad,
                Tensor::zeros((b, total - n), DType::F32, valid.device())?,
            ],
            1,
        )?
    } else {
        pad
    };
    pad.reshape((b, 1, 1, total))
}

/// Causal mask plus caption key padding, `[b, 1, s, past + s]`, for `s` queries after `past`
/// cached positions (the HF target's mask, spec §5.4; use it for the t2i prefill and steps).
pub fn caption_mask(valid: &Tensor, s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let causal = causal_mask(s, past, device)?.unsqueeze(0)?.unsqueeze(0)?;
    causal.broadcast_add(&key_padding_mask(valid, past + s)?)
}

/// Fused-projection attention block (`wqkv` rows `[q | k | v]`, `wo`).
#[derive(Clone, Debug)]
pub struct Attention {
    wqkv: Linear,
    wo: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads `wqkv.weight` and `wo.weight` under `vb`.
    pub fn load(vb: VarBuilder, dim: usize, n_head: usize, n_kv_head: usize) -> Result<Self> {
        let head_dim = dim / n_head;
        let wqkv = linear_no_bias(dim, (n_head + 2 * n_kv_head) * head_dim, vb.pp("wqkv"))?;
        let wo = linear_no_bias(n_head * head_dim, dim, vb.pp("wo"))?;
        Ok(Self::from_parts(wqkv, wo, n_head, n_kv_head, head_dim))
    }

    /// Builds the block from already loaded projections.
    pub fn from_parts(
        wqkv: Linear,
        wo: Linear,
        n_head: usize,
        n_kv_head: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            wqkv,
            wo,
            n_head,
            n_kv_head,
            head_dim,
        }
    }

    /// # Shapes
    /// - `x`: `[b, s, dim]` → `[b, s, dim]`; K/V appended to `cache` layer `layer` (or
    ///   attention over `x` only when `cache` is `None`).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, kvh, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let qkv = crate::fused::linear(&self.wqkv, x)?;
        if let Some(c) = &cache {
            if crate::fused::active(&qkv) && crate::fused::supports_head_dim(&qkv, hd) {
                return self.forward_fused(&qkv, rope, mask, layer, c);
            }
        }
        let v = qkv
            .narrow(D::Minus1, (h + kvh) * hd, kvh * hd)?
            .reshape((b, s, kvh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = if qkv.track_op() {
            // training: the op-by-op rotation has gradients
            let q = qkv.narrow(D::Minus1, 0, h * hd)?.reshape((b, s, h, hd))?;
            let k = qkv
                .narrow(D::Minus1, h * hd, kvh * hd)?
                .reshape((b, s, kvh, hd))?;
            (
                rope.apply(&q)?.transpose(1, 2)?.contiguous()?,
                rope.apply(&k)?.transpose(1, 2)?.contiguous()?,
            )
        } else {
            // inference: q and k rotated together in f32 by one fused kernel
            let qk = qkv
                .narrow(D::Minus1, 0, (h + kvh) * hd)?
                .reshape((b, s, h + kvh, hd))?
                .transpose(1, 2)?
                .to_dtype(DType::F32)?;
            let qk = rope.apply_heads_first(&qk)?.to_dtype(x.dtype())?;
            (
                qk.narrow(1, 0, h)?.contiguous()?,
                qk.narrow(1, h, kvh)?.contiguous()?,
            )
        };
        let (k, v, past) = match cache {
            Some(c) => {
                let past = c.len();
                let (k, v) = c.append(layer, &k, &v).map_err(candle_core::Error::wrap)?;
                (k, v, past)
            }
            None => (k, v, 0),
        };
        let (k, v) = (repeat_kv(k, h / kvh)?, repeat_kv(v, h / kvh)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.to_dtype(DType::F32)?;
        let scores = match mask {
            AttnMask::Causal if k.dim(2)? != past + s => {
                candle_core::bail!("a fixed-shape KV cache needs an explicit attention mask")
            }
            AttnMask::Causal if s == 1 => scores,
            AttnMask::Causal => scores.broadcast_add(&causal_mask(s, past, x.device())?)?,
            AttnMask::Custom(m) => {
                // keys: past + s, or the whole buffer in the cache's fixed-shape mode
                let t = k.dim(2)?;
                if m.dim(D::Minus1)? != t || m.dim(D::Minus2)? != s {
                    candle_core::bail!(
                        "attention mask {:?} does not cover {s} queries over {t} keys",
                        m.dims()
                    );
                }
                scores.broadcast_add(&m.to_dtype(DType::F32)?)?
            }
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * hd))?;
        crate::fused::linear(&self.wo, &out)
    }
}

impl Attention {
    /// The fused path: [`Attention::attend_fused`], then `wo`.
    fn forward_fused(
        &self,
        qkv: &Tensor,
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &KvCache,
    ) -> Result<Tensor> {
        crate::fused::linear(&self.wo, &self.attend_fused(qkv, rope, mask, layer, cache)?)
    }

    /// Fused attention before the output projection: the new keys of `qkv` rotated and K/V
    /// written into the cache, and the attention (queries rotated on load); one kernel on
    /// CUDA for several tokens per row ([`crate::fused::attention_write_kv`]).
    ///
    /// # Shapes
    /// - `qkv`: `[b, s, (h + 2 kvh) * hd]` → `[b, s, h * hd]`
    pub(crate) fn attend_fused(
        &self,
        qkv: &Tensor,
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &KvCache,
    ) -> Result<Tensor> {
        self.fused_step(qkv, rope, mask, layer, cache)?
            .attend_writing(qkv, layer)
    }

    /// A decode step's `wqkv` product of hidden state `h` (RMSNorm `norm` first) with the K/V
    /// write in its epilogue ([`crate::fused::small_linear_kv`]), then the fused attention.
    ///
    /// # Shapes
    /// - `h`: `[b, 1, dim]` → `[b, 1, h * hd]`
    pub(crate) fn attend_small_kv(
        &self,
        h: &Tensor,
        norm: (&Tensor, f32),
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let st = self.fused_step(h, rope, mask, layer, cache)?;
        let qkv = crate::fused::small_linear_kv(
            h,
            self.wqkv_weight(),
            Some(norm),
            st.kv,
            &st.rope,
            layer,
            st.at,
            st.heads,
        )?;
        st.attend(&qkv, layer)
    }

    /// A decode step of the whole block `weights` (this attention's and its FFN's) on hidden
    /// state `h` (`[b, 1, dim]`) as one kernel, see [`crate::fused::decode_layer`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_layer(
        &self,
        h: &Tensor,
        weights: &crate::fused::BlockWeights,
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let st = self.fused_step(h, rope, mask, layer, cache)?;
        crate::fused::decode_layer(
            h,
            weights,
            &st.rope,
            st.kv,
            layer,
            st.at,
            st.keys,
            &st.key_mask,
            st.heads,
        )
    }

    /// The cache slot ([`Self::cache_slot`]) and packed RoPE rows of a fused step whose input
    /// `x` is `[b, s, _]`.
    fn fused_step<'c>(
        &self,
        x: &Tensor,
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &'c KvCache,
    ) -> Result<FusedStep<'c>> {
        let (b, s, _) = x.dims3()?;
        let heads = self.heads();
        let (kv, at, keys, key_mask) = Self::cache_slot(b, s, heads, mask, layer, cache)?;
        Ok(FusedStep {
            kv,
            at,
            keys,
            key_mask,
            rope: rope.packed()?,
            heads,
        })
    }

    /// The cache tensor, the slot the `s` new positions of `b` rows go to, the keys they
    /// attend over, and `mask` as the fused kernels take it.
    fn cache_slot<'c>(
        b: usize,
        s: usize,
        heads: crate::fused::Heads,
        mask: &AttnMask,
        layer: usize,
        cache: &'c KvCache,
    ) -> Result<(&'c Tensor, usize, usize, crate::fused::KeyMask)> {
        let (kv, at, keys) = cache
            .write_slot(layer, b, heads.kvh, s)
            .map_err(candle_core::Error::wrap)?;
        let key_mask = match mask {
            AttnMask::Causal if cache.staging().is_some() => {
                candle_core::bail!("a fixed-shape KV cache needs an explicit attention mask")
            }
            AttnMask::Causal if s == 1 => crate::fused::KeyMask::None,
            AttnMask::Causal => crate::fused::KeyMask::Causal { past: at },
            AttnMask::Custom(m) => match cache.filled_on_device() {
                // a fixed-shape step that keeps its filled length on the device: the kernels
                // skip the empty slots between it and the next slot in use
                Some((filled, at)) => crate::fused::KeyMask::Staged {
                    mask: m.clone(),
                    filled: filled.clone(),
                    at,
                },
                None => crate::fused::KeyMask::Additive(m.clone()),
            },
        };
        Ok((kv, at, keys, key_mask))
    }

    /// This attention's head layout.
    pub(crate) fn heads(&self) -> crate::fused::Heads {
        crate::fused::Heads {
            h: self.n_head,
            kvh: self.n_kv_head,
            hd: self.head_dim,
        }
    }

    /// Whether the fused kernels serve this block's heads for `x` (see [`crate::fused`]).
    pub(crate) fn fused_ok(&self, x: &Tensor) -> bool {
        crate::fused::active(x) && crate::fused::supports_head_dim(x, self.head_dim)
    }

    /// The `[q | k | v]` projection weight `[(h + 2 kvh) hd, dim]`.
    pub(crate) fn wqkv_weight(&self) -> &Tensor {
        self.wqkv.weight()
    }

    /// The output projection weight `[dim, h hd]`.
    pub(crate) fn wo_weight(&self) -> &Tensor {
        self.wo.weight()
    }

    /// The output projection.
    pub(crate) fn wo(&self) -> &Linear {
        &self.wo
    }

    /// [`Attention::forward`] up to `wo` on the fused path (`wqkv`, then
    /// [`Attention::attend_fused`], the new K/V written into `cache`), so that the caller can
    /// fuse `wo` with what follows; `None` where the fused path does not serve `x`.
    ///
    /// # Shapes
    /// - `x`: `[b, s, dim]` → `[b, s, h * hd]`
    pub(crate) fn attend_before_wo(
        &self,
        x: &Tensor,
        rope: &RopeRows,
        mask: &AttnMask,
        layer: usize,
        cache: &KvCache,
    ) -> Result<Option<Tensor>> {
        if !self.fused_ok(x) || self.wqkv.weight().track_op() {
            return Ok(None);
        }
        let qkv = crate::fused::linear(&self.wqkv, x)?;
        Ok(Some(self.attend_fused(&qkv, rope, mask, layer, cache)?))
    }
}

/// Repeats each K/V head `n` times for grouped-query attention.
fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n, t, d))?
        .reshape((b, kvh * n, t, d))
}

/// A fused step's cache slot, key mask and packed RoPE rows ([`Attention::fused_step`]).
struct FusedStep<'c> {
    kv: &'c Tensor,
    at: usize,
    keys: usize,
    key_mask: crate::fused::KeyMask,
    rope: Tensor,
    heads: crate::fused::Heads,
}

impl FusedStep<'_> {
    /// The new keys and values of `qkv` written into the step's slot, then [`Self::attend`]
    /// (one kernel where [`crate::fused::attention_write_kv`] can).
    fn attend_writing(&self, qkv: &Tensor, layer: usize) -> Result<Tensor> {
        crate::fused::attention_write_kv(
            qkv,
            &self.rope,
            self.kv,
            layer,
            self.at,
            self.keys,
            &self.key_mask,
            self.heads,
        )
    }

    /// The fused attention of `qkv`'s queries over the step's keys.
    fn attend(&self, qkv: &Tensor, layer: usize) -> Result<Tensor> {
        crate::fused::attention(
            qkv,
            &self.rope,
            self.kv,
            layer,
            self.keys,
            &self.key_mask,
            self.heads,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() -> Result<()> {
        let dev = Device::Cpu;
        let m = causal_mask(2, 1, &dev)?.to_vec2::<f32>()?;
        assert_eq!(m[0][..2], [0.0, 0.0]);
        assert!(m[0][2].is_infinite());
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
        let valid = Tensor::new(&[[0u8, 1, 1]], &dev)?;
        let cm = caption_mask(&valid, 3, 0, &dev)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        assert_eq!(cm[0][0], PAD_NEG);
        assert!(cm[0][1].is_infinite());
        assert_eq!(cm[2], vec![PAD_NEG, 0.0, 0.0]);
        Ok(())
    }
}
