//! The LlamaGen VQ tokenizer (VQ-16 and smaller variants of the same design).
//!
//! Reference: LlamaGen `tokenizer/tokenizer_image/vq_model.py` (Sun et al., 2024, "Autoregressive
//! Model Beats Diffusion"); architecture facts in `docs/llamagen-spec.md` §2. One implementation
//! serves the official VQ-16 (`vq_ds16_c2i.pt`, `vq_ds16_t2i.pt`, loaded through a `VarBuilder`
//! over the checkpoint's `"model"` dict) and small grey models trained by [`crate::train::vq`].
//!
//! Parameter names equal the official checkpoint keys (`encoder.conv_blocks.0.res.1.norm2.weight`,
//! `quantize.embedding.weight`, ...), so the same `load` reads `.pt`, `.safetensors` and a
//! training `VarMap`.
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, GroupNorm, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// GroupNorm epsilon used throughout the VQ model.
pub const GROUP_NORM_EPS: f64 = 1e-6;
/// Epsilon of the l2 normalisation of `z` and the codebook rows (`F.normalize`).
pub const L2_EPS: f64 = 1e-12;

/// Hyper-parameters of a VQ model. The JSON form is our HF-style `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    /// Number of codebook entries.
    pub codebook_size: usize,
    /// Dimension of a codebook entry.
    pub codebook_embed_dim: usize,
    /// Whether `z` and the codebook rows are l2-normalised before the nearest-code search.
    pub codebook_l2_norm: bool,
    /// Channels of the encoder output / decoder input.
    pub z_channels: usize,
    /// Base channel count.
    pub ch: usize,
    /// Channel multiplier per resolution level; `2^(len-1)` is the downsampling factor.
    pub ch_mult: Vec<usize>,
    /// Resnet blocks per encoder level (the decoder uses one more per level).
    pub num_res_blocks: usize,
    /// Image channels (3 RGB, 1 grey).
    pub in_channels: usize,
    /// Whether the lowest-resolution level has an attention block after each resnet.
    pub attn_at_lowest: bool,
    /// GroupNorm groups (32 in the official model).
    pub norm_groups: usize,
}

impl VqConfig {
    /// The official VQ-16 tokenizer (`vq_ds16_c2i.pt`, `vq_ds16_t2i.pt`).
    pub fn vq16() -> Self {
        Self {
            codebook_size: 16384,
            codebook_embed_dim: 8,
            codebook_l2_norm: true,
            z_channels: 256,
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            in_channels: 3,
            attn_at_lowest: true,
            norm_groups: 32,
        }
    }

    /// The small grey tokenizer we train on Fashion-MNIST (32x32 padded images → 16x16 tokens).
    pub fn fashion_small() -> Self {
        Self {
            codebook_size: 1024,
            codebook_embed_dim: 8,
            codebook_l2_norm: true,
            z_channels: 32,
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            in_channels: 1,
            attn_at_lowest: false,
            norm_groups: 8,
        }
    }

    /// Spatial downsampling factor, `2^(levels-1)`.
    pub fn downsample(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Parses a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| Error::invalid("VQ config JSON", format!("{e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialises to pretty JSON (the `config.json` of a saved model).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks that the sizes are consistent (non-zero, channels divisible by the groups).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("VQ config", m));
        if self.codebook_size == 0 || self.codebook_embed_dim == 0 || self.z_channels == 0 {
            return bad("codebook_size, codebook_embed_dim and z_channels must be > 0".into());
        }
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad("ch must be > 0 and ch_mult a non-empty list of positive numbers".into());
        }
        if self.in_channels == 0 || self.norm_groups == 0 {
            return bad("in_channels and norm_groups must be > 0".into());
        }
        for m in &self.ch_mult {
            if !(self.ch * m).is_multiple_of(self.norm_groups) {
                return bad(format!(
                    "norm_groups {} must divide every level's channels (ch {} x {m})",
                    self.norm_groups, self.ch
                ));
            }
        }
        if self.codebook_size > u32::MAX as usize {
            return bad("codebook_size must fit in u32".into());
        }
        Ok(())
    }
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: pad,
        stride,
        ..Default::default()
    };
    let c = candle_nn::conv2d(cin, cout, k, cfg, vb)?;
    Ok(Conv2d {
        weight: c.weight().clone(),
        bias: c.bias().cloned(),
        stride,
        pad,
    })
}

/// A 2D convolution with bias. With trainable weights (candle `Var`s) it runs as explicit
/// im2col + matmul, whose backward pass is a matmul: candle's own conv backward goes through
/// `conv_transpose2d`, which is about 5x slower than the forward on the CPU. Inference with
/// loaded weights uses candle's `conv2d`.
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
}

impl Module for Conv2d {
    /// # Shapes
    /// `[b, cin, h, w]` → `[b, cout, ho, wo]`
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = if self.weight.is_variable() {
            im2col_conv(x, &self.weight, self.stride, self.pad)?
        } else {
            x.conv2d(&self.weight, self.pad, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Convolution as `weight [cout, cin*k*k] x columns [b, cin*k*k, ho*wo]`, built from shifted
/// views of the zero-padded input (differentiable with cheap backward passes).
fn im2col_conv(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let x = if pad > 0 {
        x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + 2 * pad, wd + 2 * pad);
    if hp < k || wp < k {
        candle_core::bail!("conv: input {h}x{wd} (padded {hp}x{wp}) is smaller than kernel {k}");
    }
    let (ho, wo) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
    let mut cols = Vec::with_capacity(k * k);
    for i in 0..k {
        for j in 0..k {
            let s = x
                .narrow(2, i, (ho - 1) * stride + 1)?
                .narrow(3, j, (wo - 1) * stride + 1)?;
            let s = if stride > 1 {
                s.pad_with_zeros(2, 0, stride - 1)?
                    .pad_with_zeros(3, 0, stride - 1)?
                    .reshape((b, cin, ho, stride, wo, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, cin, ho, wo))?
            } else {
                s
            };
            cols.push(s);
        }
    }
    let cols = Tensor::stack(&cols, 2)?.reshape((b, cin * k * k, ho * wo))?;
    let w = w.reshape((cout, cin * k * k))?;
    w.broadcast_matmul(&cols)?.reshape((b, cout, ho, wo))
}

fn norm(groups: usize, c: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    candle_nn::group_norm(groups, c, GROUP_NORM_EPS, vb)
}

/// `norm1 → swish → conv1 → norm2 → swish → conv2`, plus a (1x1 `nin_shortcut`) residual.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let nin_shortcut = if cin != cout {
            Some(conv(cin, cout, 1, 1, 0, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm(groups, cin, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: norm(groups, cout, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    /// # Shapes
    /// `[b, cin, h, w]` → `[b, cout, h, w]`
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention with scale `c^-1/2` and a residual connection.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn load(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: norm(groups, c, vb.pp("norm"))?,
            q: conv(c, c, 1, 1, 0, vb.pp("q"))?,
            k: conv(c, c, 1, 1, 0, vb.pp("k"))?,
            v: conv(c, c, 1, 1, 0, vb.pp("v"))?,
            proj_out: conv(c, c, 1, 1, 0, vb.pp("proj_out"))?,
        })
    }
}

impl Module for AttnBlock {
    /// # Shapes
    /// `[b, c, h, w]` → `[b, c, h, w]`
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let q = self
            .q
            .forward(&hn)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?; // [b, hw, c]
        let k = self.k.forward(&hn)?.reshape((b, c, h * w))?; // [b, c, hw]
        let v = self.v.forward(&hn)?.reshape((b, c, h * w))?; // [b, c, hw]
        let scores = (q.contiguous()?.matmul(&k)? * (c as f64).powf(-0.5))?; // [b, hw(q), hw(k)]
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        // out[b, c, i] = sum_j v[b, c, j] attn[b, i, j]
        let out = v.matmul(&attn.transpose(1, 2)?.contiguous()?)?;
        let out = self.proj_out.forward(&out.reshape((b, c, h, w))?)?;
        x + out
    }
}

/// One resolution level: resnets (each optionally followed by attention), then a resample conv.
#[derive(Debug, Clone)]
struct Level {
    res: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    /// Downsample (encoder) or upsample (decoder) conv, when the level has one.
    resample: Option<Conv2d>,
    up: bool,
}

impl Module for Level {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.res.iter().enumerate() {
            h = r.forward(&h)?;
            if let Some(a) = self.attn.get(i) {
                h = a.forward(&h)?;
            }
        }
        match (&self.resample, self.up) {
            (None, _) => Ok(h),
            (Some(c), false) => {
                // Pad right and bottom by one, then a 3x3 stride-2 conv without padding.
                let h = h
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                c.forward(&h)
            }
            (Some(c), true) => {
                // Nearest x2 as a broadcast (same values as `upsample_nearest2d`, and a
                // backward pass that is a plain sum instead of a grouped conv).
                let (b, ch, hh, ww) = h.dims4()?;
                let up = h
                    .reshape((b, ch, hh, 1, ww, 1))?
                    .broadcast_as((b, ch, hh, 2, ww, 2))?
                    .reshape((b, ch, hh * 2, ww * 2))?;
                c.forward(&up)
            }
        }
    }
}

/// `[Resnet, Attn, Resnet]` middle section (`mid.0`, `mid.1`, `mid.2`).
#[derive(Debug, Clone)]
struct Mid {
    r0: ResnetBlock,
    attn: AttnBlock,
    r2: ResnetBlock,
}

impl Mid {
    fn load(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            r0: ResnetBlock::load(c, c, groups, vb.pp("0"))?,
            attn: AttnBlock::load(c, groups, vb.pp("1"))?,
            r2: ResnetBlock::load(c, c, groups, vb.pp("2"))?,
        })
    }
}

impl Module for Mid {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.r2.forward(&self.attn.forward(&self.r0.forward(x)?)?)
    }
}

/// Image → latent `z` (before `quant_conv`).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    conv_blocks: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(cfg: &VqConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = cfg.norm_groups;
        let n = cfg.ch_mult.len();
        let conv_in = conv(cfg.in_channels, cfg.ch, 3, 1, 1, vb.pp("conv_in"))?;
        let mut block_in = cfg.ch;
        let mut conv_blocks = Vec::with_capacity(n);
        for l in 0..n {
            let vbl = vb.pp(format!("conv_blocks.{l}"));
            let block_out = cfg.ch * cfg.ch_mult[l];
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks {
                res.push(ResnetBlock::load(
                    block_in,
                    block_out,
                    g,
                    vbl.pp(format!("res.{j}")),
                )?);
                block_in = block_out;
                if l == n - 1 && cfg.attn_at_lowest {
                    attn.push(AttnBlock::load(block_in, g, vbl.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if l != n - 1 {
                Some(conv(
                    block_in,
                    block_in,
                    3,
                    2,
                    0,
                    vbl.pp("downsample.conv"),
                )?)
            } else {
                None
            };
            conv_blocks.push(Level {
                res,
                attn,
                resample,
                up: false,
            });
        }
        Ok(Self {
            conv_in,
            conv_blocks,
            mid: Mid::load(block_in, g, vb.pp("mid"))?,
            norm_out: norm(g, block_in, vb.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.z_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for l in &self.conv_blocks {
            h = l.forward(&h)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// Latent → image; `conv_blocks.0` is the lowest resolution.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    conv_blocks: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(cfg: &VqConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = cfg.norm_groups;
        let n = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[n - 1];
        let conv_in = conv(cfg.z_channels, block_in, 3, 1, 1, vb.pp("conv_in"))?;
        let mid = Mid::load(block_in, g, vb.pp("mid"))?;
        let mut conv_blocks = Vec::with_capacity(n);
        for (i, l) in (0..n).rev().enumerate() {
            let vbl = vb.pp(format!("conv_blocks.{i}"));
            let block_out = cfg.ch * cfg.ch_mult[l];
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks + 1 {
                res.push(ResnetBlock::load(
                    block_in,
                    block_out,
                    g,
                    vbl.pp(format!("res.{j}")),
                )?);
                block_in = block_out;
                if l == n - 1 && cfg.attn_at_lowest {
                    attn.push(AttnBlock::load(block_in, g, vbl.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if l != 0 {
                Some(conv(block_in, block_in, 3, 1, 1, vbl.pp("upsample.conv"))?)
            } else {
                None
            };
            conv_blocks.push(Level {
                res,
                attn,
                resample,
                up: true,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            conv_blocks,
            norm_out: norm(g, block_in, vb.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.in_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for l in &self.conv_blocks {
            h = l.forward(&h)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// Result of [`VqModel::quantize`].
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Code indices `[b, h*w]` u32, raster order.
    pub codes: Tensor,
    /// Straight-through quantised latent `[b, d, h, w]`: forward value = (normalised) codebook
    /// rows, gradient flows to `z`.
    pub zq: Tensor,
    /// Codebook loss `mean((zq - sg(z))^2)` (moves the codebook towards the encoder outputs).
    pub codebook_loss: Tensor,
    /// Commitment loss `mean((sg(zq) - z)^2)` (not yet multiplied by beta).
    pub commit_loss: Tensor,
    /// Squared distances `[b*h*w, V]` to every code (their negation are the logits of an
    /// entropy loss).
    pub dist: Tensor,
}

/// The VQ tokenizer: encoder, quantiser and decoder.
#[derive(Debug, Clone)]
pub struct VqModel {
    encoder: Encoder,
    quant_conv: Conv2d,
    embedding: Tensor,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    cfg: VqConfig,
}

impl VqModel {
    /// Builds the model from `vb`, whose names are the official checkpoint keys (spec §2.5).
    /// With a `VarMap`-backed builder this creates freshly initialised trainable weights.
    pub fn load(vb: VarBuilder, cfg: &VqConfig) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (v, d) = (cfg.codebook_size, cfg.codebook_embed_dim);
        // Official init: U(-1/V, 1/V), then l2-normalised when codebook_l2_norm.
        let init = candle_nn::Init::Uniform {
            lo: -1.0 / v as f64,
            up: 1.0 / v as f64,
        };
        let embedding = vb
            .pp("quantize.embedding")
            .get_with_hints((v, d), "weight", init)?;
        Ok(Self {
            encoder: Encoder::load(cfg, vb.pp("encoder"))?,
            quant_conv: conv(cfg.z_channels, d, 1, 1, 0, vb.pp("quant_conv"))?,
            embedding,
            post_quant_conv: conv(d, cfg.z_channels, 1, 1, 0, vb.pp("post_quant_conv"))?,
            decoder: Decoder::load(cfg, vb.pp("decoder"))?,
            cfg: cfg.clone(),
        })
    }

    /// Loads a model saved by [`crate::train::vq`] (a folder with `config.json` and
    /// `model.safetensors`).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            Error::load(
                &cfg_path,
                format!("{e} (expected a VQ model folder with config.json and model.safetensors)"),
            )
        })?;
        let cfg = VqConfig::from_json(&text).map_err(|e| Error::load(&cfg_path, e.to_string()))?;
        let st = dir.join("model.safetensors");
        if !st.is_file() {
            return Err(Error::load(&st, "missing (expected next to config.json)"));
        }
        // SAFETY: the file is memory-mapped read-only; we do not modify it while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&st], DType::F32, device) }
            .map_err(|e| Error::load(&st, e.to_string()))?;
        Self::load(vb, &cfg).map_err(|e| Error::load(&st, e.to_string()))
    }

    /// Loads an official LlamaGen `.pt` checkpoint (weights under the `"model"` key).
    pub fn load_pt(path: &Path, cfg: &VqConfig, device: &Device) -> Result<Self> {
        let vb =
            VarBuilder::from_pth_with_state(path, DType::F32, "model", device).map_err(|e| {
                Error::load(
                    path,
                    format!("{e} (expected a LlamaGen VQ .pt with a \"model\" dict)"),
                )
            })?;
        Self::load(vb, cfg).map_err(|e| Error::load(path, e.to_string()))
    }

    /// The configuration.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        self.embedding.device()
    }

    /// The raw (not normalised) codebook `[V, D]`, as stored.
    pub fn codebook(&self) -> candle_core::Result<Tensor> {
        Ok(self.embedding.clone())
    }

    /// The codebook used for lookup: rows l2-normalised when the config says so.
    pub fn lookup_codebook(&self) -> candle_core::Result<Tensor> {
        if self.cfg.codebook_l2_norm {
            l2_normalize(&self.embedding)
        } else {
            Ok(self.embedding.clone())
        }
    }

    /// Encoder plus `quant_conv`: the pre-quantisation latent.
    ///
    /// # Shapes
    /// `images [b, c, H, W]` in [-1, 1] → `z [b, D, H/ds, W/ds]`
    pub fn encode_latent(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.quant_conv.forward(&self.encoder.forward(images)?)
    }

    /// Nearest-code quantisation of `z` (l2-normalised when configured; ties go to the first
    /// index), with the straight-through latent and the VQ losses.
    ///
    /// # Shapes
    /// `z [b, D, h, w]` → codes `[b, h*w]` u32, `zq [b, D, h, w]`
    pub fn quantize(&self, z: &Tensor) -> candle_core::Result<Quantized> {
        let (b, d, h, w) = z.dims4()?;
        let zf = z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
        let (zf, emb) = if self.cfg.codebook_l2_norm {
            (l2_normalize(&zf)?, l2_normalize(&self.embedding)?)
        } else {
            (zf, self.embedding.clone())
        };
        let dist = sq_dist(&zf, &emb)?;
        let codes = dist.detach().argmin(D::Minus1)?.to_dtype(DType::U32)?;
        let zq = emb.index_select(&codes, 0)?;
        let codebook_loss = (&zq - zf.detach())?.sqr()?.mean_all()?;
        let commit_loss = (zq.detach() - &zf)?.sqr()?.mean_all()?;
        let st = (&zf + (zq - &zf)?.detach())?;
        let zq = st
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(Quantized {
            codes: codes.reshape((b, h * w))?,
            zq,
            codebook_loss,
            commit_loss,
            dist,
        })
    }

    /// Image → codes.
    ///
    /// # Shapes
    /// `images [b, c, H, W]` f32 in [-1, 1] → `[b, (H/ds)*(W/ds)]` u32 (raster order)
    pub fn encode(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.encode_latent(images)?;
        let (b, d, h, w) = z.dims4()?;
        let zf = z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
        let zf = if self.cfg.codebook_l2_norm {
            l2_normalize(&zf)?
        } else {
            zf
        };
        let dist = sq_dist(&zf, &self.lookup_codebook()?)?;
        dist.argmin(D::Minus1)?
            .to_dtype(DType::U32)?
            .reshape((b, h * w))
    }

    /// Quantised latent → image (`post_quant_conv` + decoder).
    ///
    /// # Shapes
    /// `zq [b, D, h, w]` → `[b, c, h*ds, w*ds]`
    pub fn decode_latent(&self, zq: &Tensor) -> candle_core::Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(zq)?)
    }

    /// Codes → image, nominally in [-1, 1] (not clamped).
    ///
    /// # Shapes
    /// `codes [b, h*w]` u32 (raster order), `grid = (h, w)` → `[b, c, h*ds, w*ds]` f32
    pub fn decode_codes(
        &self,
        codes: &Tensor,
        grid: (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (b, n) = codes.dims2()?;
        let (h, w) = grid;
        if n != h * w {
            candle_core::bail!("decode_codes: {n} codes per image do not fill a {h}x{w} grid");
        }
        let v = self.cfg.codebook_size as u32;
        let max = codes.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max >= v {
            candle_core::bail!("decode_codes: code {max} is out of range for a codebook of {v}");
        }
        let emb = self.lookup_codebook()?;
        let d = self.cfg.codebook_embed_dim;
        let zq = emb
            .index_select(&codes.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        self.decode_latent(&zq)
    }
}

/// `x / max(||x||_2, 1e-12)` over the last dimension.
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(L2_EPS, f64::INFINITY)?;
    x.broadcast_div(&n)
}

/// Squared distances `|a|^2 + |e|^2 - 2 a.e`, as the reference computes them.
///
/// # Shapes
/// `a [n, d]`, `e [v, d]` → `[n, v]`
fn sq_dist(a: &Tensor, e: &Tensor) -> candle_core::Result<Tensor> {
    let a2 = a.sqr()?.sum_keepdim(1)?; // [n, 1]
    let e2 = e.sqr()?.sum(1)?.unsqueeze(0)?; // [1, v]
    let ae = a.matmul(&e.t()?)?; // [n, v]
    a2.broadcast_add(&e2)?.broadcast_sub(&(ae * 2.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> VqConfig {
        VqConfig {
            codebook_size: 16,
            codebook_embed_dim: 4,
            codebook_l2_norm: true,
            z_channels: 8,
            ch: 8,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            in_channels: 1,
            attn_at_lowest: true,
            norm_groups: 4,
        }
    }

    #[test]
    fn shapes_round_trip() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = tiny();
        let m = VqModel::load(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg)?;
        let x = Tensor::rand(-1f32, 1f32, (2, 1, 8, 8), &dev)?;
        let codes = m.encode(&x)?;
        assert_eq!(codes.dims(), &[2, 16]);
        let q = m.quantize(&m.encode_latent(&x)?)?;
        assert_eq!(q.codes.to_vec2::<u32>()?, codes.to_vec2::<u32>()?);
        let y = m.decode_codes(&codes, (4, 4))?;
        assert_eq!(y.dims(), &[2, 1, 8, 8]);
        assert!(m.decode_codes(&codes, (2, 4)).is_err());
        assert_eq!(cfg.downsample(), 2);
        assert_eq!(VqConfig::vq16().downsample(), 16);
        Ok(())
    }

    /// VQ-16 builds exactly the tensors of the official checkpoint (spec §2.5: 344 tensors
    /// including the unused `quantize.codebook_used`, about 71.9M values).
    #[test]
    fn vq16_names_and_shapes_match_checkpoint_table() -> candle_core::Result<()> {
        let vm = VarMap::new();
        let _m = VqModel::load(
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            &VqConfig::vq16(),
        )?;
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("lock".into()))?;
        assert_eq!(data.len(), 343);
        let total: usize = data.values().map(|v| v.elem_count()).sum();
        assert!(
            (71_800_000..72_000_000).contains(&(total + 65536)),
            "{total}"
        );
        let shape = |k: &str| data.get(k).map(|v| v.dims().to_vec());
        assert_eq!(
            shape("encoder.conv_blocks.4.attn.1.q.weight"),
            Some(vec![512, 512, 1, 1])
        );
        assert_eq!(
            shape("encoder.conv_blocks.3.downsample.conv.weight"),
            Some(vec![256, 256, 3, 3])
        );
        assert_eq!(
            shape("encoder.conv_blocks.4.res.0.nin_shortcut.weight"),
            Some(vec![512, 256, 1, 1])
        );
        assert_eq!(
            shape("decoder.conv_blocks.0.attn.2.proj_out.bias"),
            Some(vec![512])
        );
        assert_eq!(
            shape("decoder.conv_blocks.1.res.0.nin_shortcut.weight"),
            Some(vec![256, 512, 1, 1])
        );
        assert_eq!(
            shape("decoder.conv_blocks.3.upsample.conv.weight"),
            Some(vec![128, 128, 3, 3])
        );
        assert_eq!(shape("decoder.conv_blocks.4.upsample.conv.weight"), None);
        assert_eq!(shape("quant_conv.weight"), Some(vec![8, 256, 1, 1]));
        assert_eq!(shape("quantize.embedding.weight"), Some(vec![16384, 8]));
        assert_eq!(shape("decoder.conv_out.weight"), Some(vec![3, 128, 3, 3]));
        Ok(())
    }

    #[test]
    fn im2col_conv_matches_conv2d() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 3, 7, 6), &dev)?;
        for (k, stride, pad) in [(3, 1, 1), (3, 2, 0), (1, 1, 0)] {
            let w = Tensor::randn(0f32, 1f32, (4, 3, k, k), &dev)?;
            let a = x.conv2d(&w, pad, stride, 1, 1)?;
            let b = im2col_conv(&x, &w, stride, pad)?;
            assert_eq!(a.dims(), b.dims());
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "k {k} stride {stride} pad {pad}: max diff {d}");
        }
        Ok(())
    }

    #[test]
    fn config_json_round_trip_and_validation() {
        let cfg = VqConfig::vq16();
        assert_eq!(VqConfig::from_json(&cfg.to_json()).ok(), Some(cfg));
        let mut bad = tiny();
        bad.norm_groups = 3;
        assert!(bad.validate().is_err());
        assert!(VqConfig::from_json("{").is_err());
    }
}
