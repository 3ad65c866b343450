//! One LlamaGen block of a decode step (one new token per batch row) as a single persistent
//! CUDA kernel (`decode_layer.cu`): RMSNorm + `wqkv` + RoPE + K/V write, attention, `wo` +
//! residual, RMSNorm + `[w1 | w3]` + SwiGLU, `w2` + residual, separated by grid-wide barriers
//! instead of seven kernel boundaries. The same numerics as the block's separate fused kernels
//! (see `decode_layer.cu` for the two places where the order of a sum differs), so the CPU
//! reference of those kernels is this kernel's reference too. bf16 / f16 on CUDA only;
//! [`decode_layer_fits`] says when it serves.
//!
//! **Opt-in (`LANTERN_DECODE_LAYER=1`)**: on an H100 at GPT-XL shapes it measured 1.70-1.76 ms
//! per decode step against 1.53-1.61 ms for the separate kernels (docs/BENCHMARKS.md
//! §0000000b). Its weights stream through shared memory ahead of the arithmetic, and that
//! stream alone runs at ~70% of the bandwidth bound; what makes it slower is the chain of
//! latencies run one after another per layer: four grid barriers (~2 µs each under the
//! stream's load), four stagings of x from L2, the attention and the products. Data-carrying
//! flags polled instead of barrier + staging measured much slower (2.6 ms, §0000000c: the
//! polling re-reads compete with the stream); fewer synchronisation points per layer (split-K
//! partial sums for wo and w2) and the whole step in one kernel are the next steps.
use candle_core::{CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use super::{CacheLayer, Heads, KeyMask};

/// The weights of one LlamaGen block as the decode-layer kernel reads them.
#[derive(Clone, Copy, Debug)]
pub struct BlockWeights<'a> {
    /// `[(h + 2 kvh) hd, dim]`.
    pub wqkv: &'a Tensor,
    /// Attention RMSNorm weight `[dim]`.
    pub attn_norm: &'a Tensor,
    /// `[dim, h hd]`.
    pub wo: &'a Tensor,
    /// FFN RMSNorm weight `[dim]`.
    pub ffn_norm: &'a Tensor,
    /// Gate rows then up rows, `[2 ffn, dim]`.
    pub w13: &'a Tensor,
    /// `[dim, ffn]`.
    pub w2: &'a Tensor,
    /// Both norms' epsilon.
    pub eps: f32,
}

/// Batch rows the kernel serves (one decode token each).
pub const LAYER_ROWS: usize = 8;

/// Shared memory a decode-layer block may use: the rows it multiplies (or the attention's
/// scratch), then the rings ([`RING_STAGE`] per stage).
pub(super) const LAYER_SHARED: usize = 224 * 1024;

/// Shared memory of one weight-stream stage of a block's rings: 8 warps x 8 16-byte loads per
/// lane (`NW`, `SL` in decode_layer.cu).
pub(super) const RING_STAGE: usize = 8 * 8 * 32 * 16;

/// Most stages a warp's ring holds (`NS` in decode_layer.cu).
pub(super) const RING_STAGES_MAX: usize = 5;

/// Whether decode steps take [`decode_layer`] where it fits: `LANTERN_DECODE_LAYER=1` (opt-in,
/// see the module notes).
pub fn decode_layer_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_DECODE_LAYER").is_ok_and(|v| v == "1"))
}

/// Whether [`decode_layer`] serves a decode step of hidden state `x` (`[b, 1, dim]`) through a
/// block of `heads` with `ffn` hidden units: CUDA, bf16 or f16, at most [`LAYER_ROWS`] rows,
/// head size 32, 64 or 128, widths multiples of 8 (and the fused kernels not turned off).
pub fn decode_layer_fits(x: &Tensor, heads: Heads, ffn: usize) -> bool {
    let Ok((b, s, dim)) = x.dims3() else {
        return false;
    };
    let a = heads.h * heads.hd;
    let kmax = dim.max(a).max(ffn);
    matches!(x.device(), Device::Cuda(_))
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && !x.track_op()
        && super::env_enabled()
        && s == 1
        && (1..=LAYER_ROWS).contains(&b)
        && matches!(heads.hd, 32 | 64 | 128)
        && heads.kvh > 0
        && heads.h.is_multiple_of(heads.kvh)
        && [dim, a, ffn].iter().all(|w| w.is_multiple_of(8))
        && ((b.next_power_of_two() * kmax + dim) * 2).next_multiple_of(16)
            + RING_STAGE * RING_STAGES_MAX
            <= LAYER_SHARED
}

/// One decode step through a LlamaGen block in one kernel: writes the new keys and values into
/// slot `at` of cache layer `layer` of `kv` (`[2, n_layer, b, kvh, max_len, hd]`), attends over
/// the first `keys` slots under `mask`, and returns the block's output. `rope` holds the packed
/// RoPE rows (`[1 or b, 1, hd / 2, 2]` f32).
///
/// # Shapes
/// - `x`: `[b, 1, dim]` → `[b, 1, dim]`
#[allow(clippy::too_many_arguments)]
pub fn decode_layer(
    x: &Tensor,
    weights: &BlockWeights,
    rope: &Tensor,
    kv: &Tensor,
    layer: usize,
    at: usize,
    keys: usize,
    mask: &KeyMask,
    heads: Heads,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let mask = match mask {
        KeyMask::None => None,
        KeyMask::Causal { past } if past + 1 >= keys => None,
        KeyMask::Causal { past } => candle_core::bail!(
            "decode layer: a causal mask over {keys} keys from position {past} is not a decode step"
        ),
        // the one-kernel block visits every slot (the mask hides the empty ones)
        KeyMask::Additive(m) | KeyMask::Staged { mask: m, .. } => {
            match super::additive_mask(m, b, 1, keys)? {
                Some(mask) => Some(mask),
                None => candle_core::bail!(
                    "decode layer: attention mask {:?} does not cover one query over {keys} keys",
                    m.dims()
                ),
            }
        }
    };
    let op = DecodeLayer {
        wqkv: weights.wqkv.contiguous()?,
        attn_norm: weights.attn_norm.contiguous()?,
        wo: weights.wo.contiguous()?,
        ffn_norm: weights.ffn_norm.contiguous()?,
        w13: weights.w13.contiguous()?,
        w2: weights.w2.contiguous()?,
        eps: weights.eps,
        rope: rope.contiguous()?,
        kv: kv.clone(),
        layer,
        at,
        keys,
        mask,
        heads,
    };
    super::aligned(x)?.apply_op1_no_bwd(&op)
}

/// The decode-layer op; it holds every tensor but the block's input.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) struct DecodeLayer {
    pub(super) wqkv: Tensor,
    pub(super) attn_norm: Tensor,
    pub(super) wo: Tensor,
    pub(super) ffn_norm: Tensor,
    pub(super) w13: Tensor,
    pub(super) w2: Tensor,
    pub(super) eps: f32,
    pub(super) rope: Tensor,
    pub(super) kv: Tensor,
    pub(super) layer: usize,
    pub(super) at: usize,
    pub(super) keys: usize,
    /// The mask and whether it has one row per batch row.
    pub(super) mask: Option<(Tensor, bool)>,
    pub(super) heads: Heads,
}

/// Sizes of one decode-layer call.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) struct LayerDims {
    /// Batch rows.
    pub(super) m: usize,
    pub(super) dim: usize,
    pub(super) ffn: usize,
    pub(super) cache: CacheLayer,
    pub(super) rope_rows: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl DecodeLayer {
    /// Checks every tensor's shape against the input `[b, 1, dim]`.
    pub(super) fn dims(&self, x: &Layout) -> Result<LayerDims> {
        const OP: &str = "decode layer";
        let (m, s, dim) = x.shape().dims3()?;
        let Heads { h, kvh, hd } = self.heads;
        let ffn = self.w2.dim(1)?;
        let expect: [(&str, &Tensor, Vec<usize>); 6] = [
            ("wqkv", &self.wqkv, vec![(h + 2 * kvh) * hd, dim]),
            ("attention norm", &self.attn_norm, vec![dim]),
            ("wo", &self.wo, vec![dim, h * hd]),
            ("ffn norm", &self.ffn_norm, vec![dim]),
            ("w1|w3", &self.w13, vec![2 * ffn, dim]),
            ("w2", &self.w2, vec![dim, ffn]),
        ];
        for (name, t, want) in &expect {
            if t.dims() != want.as_slice() {
                candle_core::bail!(
                    "{OP}: {name} weight {:?}, expected {want:?} for rows of {dim}",
                    t.dims()
                );
            }
        }
        if s != 1 || !(1..=LAYER_ROWS).contains(&m) || self.at >= self.keys {
            candle_core::bail!(
                "{OP}: input {:?} with the new token at slot {} of {} keys is not a decode step of at most {LAYER_ROWS} rows",
                x.dims(),
                self.at,
                self.keys
            );
        }
        let cache = CacheLayer::check(OP, self.kv.layout(), self.layer, m, self.heads, self.keys)?;
        let rope_rows = super::rope_rows(self.rope.dims(), m, 1, hd)?;
        Ok(LayerDims {
            m,
            dim,
            ffn,
            cache,
            rope_rows,
        })
    }
}

impl CustomOp1 for DecodeLayer {
    fn name(&self) -> &'static str {
        "lantern-decode-layer"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("decode layer: a CUDA kernel (the CPU takes the block's separate ops)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dims(xl)?;
        let out = super::cuda_layer::decode_layer(self, &d, x, xl)?;
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A block of `dim` 16, 2 heads of 8, ffn 32, on the CPU.
    fn parts() -> Result<(Vec<Tensor>, Tensor, Tensor, Tensor, Heads)> {
        let dev = Device::Cpu;
        let w = |r: usize, c: usize| Tensor::zeros((r, c), DType::BF16, &dev);
        let weights = vec![
            w(3 * 16, 16)?,
            Tensor::ones(16, DType::BF16, &dev)?,
            w(16, 16)?,
            Tensor::ones(16, DType::BF16, &dev)?,
            w(64, 16)?,
            w(16, 32)?,
        ];
        let x = Tensor::zeros((2, 1, 16), DType::BF16, &dev)?;
        let kv = Tensor::zeros((2, 1, 2, 2, 8, 8), DType::BF16, &dev)?;
        let rope = Tensor::zeros((1, 1, 4, 2), DType::F32, &dev)?;
        Ok((
            weights,
            x,
            kv,
            rope,
            Heads {
                h: 2,
                kvh: 2,
                hd: 8,
            },
        ))
    }

    #[test]
    fn decode_layer_refuses_the_cpu_and_bad_masks_with_clear_errors() -> Result<()> {
        let (w, x, kv, rope, heads) = parts()?;
        let weights = BlockWeights {
            wqkv: &w[0],
            attn_norm: &w[1],
            wo: &w[2],
            ffn_norm: &w[3],
            w13: &w[4],
            w2: &w[5],
            eps: 1e-5,
        };
        assert!(!decode_layer_fits(&x, heads, 32), "the kernel is CUDA only");
        let run = |mask: &KeyMask| decode_layer(&x, &weights, &rope, &kv, 0, 4, 5, mask, heads);
        let e = run(&KeyMask::None).unwrap_err().to_string();
        assert!(e.contains("decode layer: a CUDA kernel"), "{e}");
        let bad = KeyMask::Additive(Tensor::zeros((2, 1, 1, 7), DType::F32, &Device::Cpu)?);
        let e = run(&bad).unwrap_err().to_string();
        assert!(e.contains("does not cover one query over 5 keys"), "{e}");
        let e = run(&KeyMask::Causal { past: 1 }).unwrap_err().to_string();
        assert!(e.contains("not a decode step"), "{e}");
        Ok(())
    }
}
