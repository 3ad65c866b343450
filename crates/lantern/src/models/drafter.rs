//! EAGLE-2 drafter of LANTERN for LlamaGen (spec §4): `fc([embed(next token); target feature])`
//! with bias and no activation, one decoder layer without input norm, no final norm; its
//! output goes through the target's `lm_head`.
use std::path::Path;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{embedding, Embedding, Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::llamagen::attention::{Attention, AttnMask};
use super::llamagen::rope::Rope;
use super::llamagen::{Config, FeedForward, RmsNorm};
use crate::cache::KvCache;
use crate::{Error, Result};

/// Drafter `config.json` (HF Llama fields plus LANTERN's `input_type`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct DrafterConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// Zero RoPE rows before the grid (t2i/t2i2: 119, c2i: 0).
    pub cls_token_num: usize,
    /// Grid cells (t2i 256, t2i2 1024, c2i 576).
    pub block_size: usize,
    /// `t2i`, `t2i2` or `c2i`.
    pub input_type: String,
    pub rope_base: f32,
    /// Zero rows after the grid (LANTERN: 10 in the table function + 10 in the model = 20).
    pub extra_rope_rows: usize,
}

impl DrafterConfig {
    /// LANTERN's hard-coded settings for an `input_type`.
    pub fn for_input_type(input_type: &str) -> std::result::Result<(usize, usize), String> {
        match input_type {
            "t2i" => Ok((119, 256)),
            "t2i2" => Ok((119, 1024)),
            "c2i" => Ok((0, 576)),
            o => Err(format!("unknown input_type `{o}`; use t2i, t2i2 or c2i")),
        }
    }

    /// Reads LANTERN's drafter `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::load(path, format!("{e}; pass the drafter's config.json")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::load(path, format!("not valid JSON ({e})")))?;
        Self::from_hf_value(&v).map_err(|m| Error::load(path, m))
    }

    /// Parses the JSON value of a drafter `config.json`.
    pub fn from_hf_value(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let u = |k: &str| -> std::result::Result<usize, String> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| format!("drafter config.json lacks integer field `{k}`"))
        };
        let heads = u("num_attention_heads")?;
        let input_type = v
            .get("input_type")
            .and_then(|x| x.as_str())
            .unwrap_or("t2i")
            .to_string();
        let (cls, block) = Self::for_input_type(&input_type)?;
        let uo = |k: &str, d: usize| v.get(k).and_then(|x| x.as_u64()).map_or(d, |x| x as usize);
        if uo("num_hidden_layers", 1) != 1 {
            return Err(
                "only one-layer drafters are supported (num_hidden_layers must be 1)".into(),
            );
        }
        Ok(Self {
            hidden_size: u("hidden_size")?,
            intermediate_size: u("intermediate_size")?,
            num_attention_heads: heads,
            num_key_value_heads: uo("num_key_value_heads", heads),
            vocab_size: u("vocab_size")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            cls_token_num: uo("cls_token_num", cls),
            block_size: uo("block_size", block),
            input_type,
            rope_base: v
                .get("rope_base")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0) as f32,
            extra_rope_rows: uo("extra_rope_rows", 20),
        })
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every tensor the drafter reads, with its shape (checkpoint names).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let kv = self.num_key_value_heads * hd;
        [
            ("embed_tokens.weight", vec![self.vocab_size, d]),
            ("fc.weight", vec![d, 2 * d]),
            ("fc.bias", vec![d]),
            (
                "layers.0.self_attn.q_proj.weight",
                vec![self.num_attention_heads * hd, d],
            ),
            ("layers.0.self_attn.k_proj.weight", vec![kv, d]),
            ("layers.0.self_attn.v_proj.weight", vec![kv, d]),
            (
                "layers.0.self_attn.o_proj.weight",
                vec![d, self.num_attention_heads * hd],
            ),
            ("layers.0.mlp.gate_proj.weight", vec![f, d]),
            ("layers.0.mlp.up_proj.weight", vec![f, d]),
            ("layers.0.mlp.down_proj.weight", vec![d, f]),
            ("layers.0.post_attention_layernorm.weight", vec![d]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect()
    }
}

/// PyTorch's default `nn.Linear` init, `U(-1/sqrt(in), 1/sqrt(in))` (used when training
/// from a `VarMap`; ignored when loading a checkpoint).
fn torch_init(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

fn torch_linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get_with_hints((o, i), "weight", torch_init(i))?;
    let b = if bias {
        Some(vb.get_with_hints(o, "bias", torch_init(i))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// The one-layer EAGLE drafter.
#[derive(Clone, Debug)]
pub struct Drafter {
    cfg: DrafterConfig,
    embed_tokens: Embedding,
    fc: Linear,
    attn: Attention,
    mlp: FeedForward,
    post_attention_layernorm: RmsNorm,
    rope: Rope,
    dtype: DType,
}

impl Drafter {
    /// Loads the drafter's state dict (names as in `pytorch_model.bin`).
    pub fn load(vb: VarBuilder, cfg: &DrafterConfig) -> candle_core::Result<Self> {
        let (d, f, h, kvh) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        let hd = cfg.head_dim();
        let grid = (cfg.block_size as f64).sqrt().round() as usize;
        if h == 0 || !d.is_multiple_of(h) || !hd.is_multiple_of(4) || grid * grid != cfg.block_size
        {
            candle_core::bail!(
                "invalid drafter config: hidden {d}, heads {h}, block {}",
                cfg.block_size
            );
        }
        let l = vb.pp("layers").pp(0);
        let a = l.pp("self_attn");
        let q = a.get_with_hints((h * hd, d), "q_proj.weight", torch_init(d))?;
        let k = a.get_with_hints((kvh * hd, d), "k_proj.weight", torch_init(d))?;
        let v = a.get_with_hints((kvh * hd, d), "v_proj.weight", torch_init(d))?;
        let wqkv = Linear::new(Tensor::cat(&[q, k, v], 0)?, None);
        let wo = torch_linear(h * hd, d, false, a.pp("o_proj"))?;
        let m = l.pp("mlp");
        let mlp = FeedForward::from_parts(
            torch_linear(d, f, false, m.pp("gate_proj"))?,
            torch_linear(f, d, false, m.pp("down_proj"))?,
            torch_linear(d, f, false, m.pp("up_proj"))?,
        )?;
        Ok(Self {
            embed_tokens: embedding(cfg.vocab_size, d, vb.pp("embed_tokens"))?,
            fc: torch_linear(2 * d, d, true, vb.pp("fc"))?,
            attn: Attention::from_parts(wqkv, wo, h, kvh, hd),
            mlp,
            post_attention_layernorm: RmsNorm::load(
                l.pp("post_attention_layernorm"),
                d,
                cfg.rms_norm_eps,
            )?,
            rope: Rope::new(
                hd,
                grid,
                cfg.rope_base,
                cfg.cls_token_num,
                cfg.extra_rope_rows,
                vb.device(),
            )?,
            dtype: vb.dtype(),
            cfg: cfg.clone(),
        })
    }

    /// Id of the token embedding tensor: identifies these weights (clones share it), e.g. to
    /// reuse caches whose CUDA graphs point at them.
    pub fn embeddings_id(&self) -> candle_core::TensorId {
        self.embed_tokens.embeddings().id()
    }

    /// RoPE table rows and the row that positions past the table read (loop positions at or
    /// past `rows` are clamped to it).
    pub fn rope_clamp(&self) -> (usize, usize) {
        let c = self.config();
        let rows = c.cls_token_num + c.block_size + c.extra_rope_rows;
        (rows, if c.extra_rope_rows > 0 { rows - 1 } else { 0 })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.embed_tokens.embeddings().device()
    }

    /// Weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The drafter's configuration.
    pub fn config(&self) -> &DrafterConfig {
        &self.cfg
    }

    /// A one-layer cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        let dev = self.embed_tokens.embeddings().device();
        KvCache::new(
            1,
            batch,
            self.cfg.num_key_value_heads,
            max_len,
            self.cfg.head_dim(),
            self.dtype,
            dev,
        )
    }

    /// Checks that the drafter fits a target model.
    pub fn check_target(&self, target: &Config) -> Result<()> {
        let c = &self.cfg;
        if c.hidden_size != target.dim || c.vocab_size != target.vocab_size {
            return Err(Error::invalid(
                "drafter",
                format!(
                    "width {} / vocab {} do not match the target's {} / {}; use the drafter trained for this target",
                    c.hidden_size, c.vocab_size, target.dim, target.vocab_size
                ),
            ));
        }
        if c.block_size != target.block_size {
            return Err(Error::invalid(
                "drafter",
                format!(
                    "grid of {} tokens does not match the target's {}; set input_type (t2i: 256, t2i2: 1024)",
                    c.block_size, target.block_size
                ),
            ));
        }
        Ok(())
    }

    /// Drafter step over `s` (feature, next token) pairs.
    ///
    /// # Shapes
    /// - `ids`: `[b, s]` u32 next tokens; `features`: `[b, s, d]` post-norm target features;
    ///   `positions`: `[s]` or `[b, s]` drafter RoPE rows → drafter features `[b, s, d]`
    ///   (no final norm; apply the target's `lm_head`)
    pub fn forward(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let out = self.run(ids, features, positions, mask, Some(&mut *cache), true)?;
        cache.advance(features.dim(1)?);
        Ok(out)
    }

    /// The fixed-shape step that CUDA graphs capture (see [`LlamaGen::forward_fixed`]):
    /// `cache` in its staging mode, `mask` `[b, 1, s, max_len]` over every slot, positions
    /// not range-checked, nothing read back to the host; the length is not advanced.
    ///
    /// [`LlamaGen::forward_fixed`]: super::llamagen::LlamaGen::forward_fixed
    pub fn forward_fixed(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if cache.staging().is_none() {
            return Err(Error::invalid(
                "KV cache",
                "forward_fixed needs the staging mode (KvCache::set_staging)",
            ));
        }
        let mask = AttnMask::Custom(mask.clone());
        self.run(ids, features, positions, &mask, Some(cache), false)
    }

    /// Teacher-forced forward without a cache (training): causal attention over the `s` pairs,
    /// so gradients reach the key/value projections.
    ///
    /// # Shapes
    /// - as [`Drafter::forward`]
    pub fn forward_train(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
    ) -> Result<Tensor> {
        self.run(ids, features, positions, &AttnMask::Causal, None, true)
    }

    fn run(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        cache: Option<&mut KvCache>,
        check_positions: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = features.dims3()?;
        let feats = features.to_dtype(self.dtype)?;
        let table = self.embed_tokens.embeddings();
        let ids = ids.to_dtype(DType::U32)?;
        let x = if crate::fused::active(&feats) && !table.track_op() {
            // one kernel: the embedding rows next to the features
            crate::fused::embed_cat(table, &ids, &feats)?
        } else {
            let e = self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)?;
            // cat along the last dim gives a transposed view in candle; CUDA matmul needs it
            // contiguous
            Tensor::cat(&[e, feats], D::Minus1)?.contiguous()?
        };
        let x = self.fc.forward(&x)?;
        let rows = if check_positions {
            self.rope.select(positions, b, s)?
        } else {
            self.rope.select_unchecked(positions, b, s)?
        };
        let a = self.attn.forward(&x, &rows, mask, 0, cache)?;
        let (x, n) = self.post_attention_layernorm.add_forward(&x, &a)?;
        Ok((x + self.mlp.forward(&n)?)?)
    }
}
