//! LlamaGen GPT hyper-parameters: presets for the published sizes and the HF `config.json`
//! mapping used by LANTERN's converted checkpoints (spec §1.1, §1.2, §1.7).
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Conditioning family of a LlamaGen GPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// Class-conditional (ImageNet labels through a `LabelEmbedder`).
    C2i,
    /// Text-conditional (flan-T5 caption features through a `CaptionEmbedder`).
    T2i,
}

/// LlamaGen GPT configuration (field names of the original `ModelArgs`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct Config {
    pub dim: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub vocab_size: usize,
    /// SwiGLU hidden width; the presets compute `find_multiple(int(2*4*dim/3), 256)`.
    pub ffn_hidden: usize,
    pub rope_base: f32,
    pub norm_eps: f64,
    pub model_type: ModelType,
    pub num_classes: usize,
    pub caption_dim: usize,
    /// Number of condition positions at the start of the sequence (c2i 1, t2i 120).
    pub cls_token_num: usize,
    /// Number of image tokens (grid side squared).
    pub block_size: usize,
    /// Zero RoPE rows appended after the grid (LANTERN's HF target: 10; original: 0).
    pub extra_rope_rows: usize,
}

/// Rounds `n` up to a multiple of `k` (LlamaGen's `find_multiple`).
pub fn find_multiple(n: usize, k: usize) -> usize {
    n.div_ceil(k) * k
}

/// FFN width LlamaGen derives from the model width.
pub fn default_ffn_hidden(dim: usize) -> usize {
    find_multiple(2 * 4 * dim / 3, 256)
}

impl Config {
    fn c2i(n_layer: usize, n_head: usize, dim: usize) -> Self {
        Self {
            dim,
            n_layer,
            n_head,
            n_kv_head: n_head,
            vocab_size: 16384,
            ffn_hidden: default_ffn_hidden(dim),
            rope_base: 10000.0,
            norm_eps: 1e-5,
            model_type: ModelType::C2i,
            num_classes: 1000,
            caption_dim: 2048,
            cls_token_num: 1,
            block_size: 256,
            extra_rope_rows: 0,
        }
    }
    /// GPT-B (12 layers, 12 heads, 768 wide), c2i, 256 tokens.
    pub fn gpt_b() -> Self {
        Self::c2i(12, 12, 768)
    }
    /// GPT-L (24 layers, 16 heads, 1024 wide), c2i, 256 tokens.
    pub fn gpt_l() -> Self {
        Self::c2i(24, 16, 1024)
    }
    /// GPT-XL (36 layers, 20 heads, 1280 wide), c2i, 256 tokens.
    pub fn gpt_xl() -> Self {
        Self::c2i(36, 20, 1280)
    }
    /// GPT-XXL (48 layers, 24 heads, 1536 wide), c2i, 256 tokens.
    pub fn gpt_xxl() -> Self {
        Self::c2i(48, 24, 1536)
    }
    /// GPT-3B (24 layers, 32 heads, 3200 wide, head_dim 100), c2i, 256 tokens.
    pub fn gpt_3b() -> Self {
        Self::c2i(24, 32, 3200)
    }
    /// Same model for another image size: `block_size` = (image_size/16)².
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        self.block_size = block_size;
        self
    }
    /// `t2i_XL_stage1_256.pt`: GPT-XL, captions (120 × 2048), 16×16 grid.
    pub fn t2i_xl_stage1() -> Self {
        Self {
            model_type: ModelType::T2i,
            cls_token_num: 120,
            ..Self::gpt_xl()
        }
    }
    /// `t2i_XL_stage2_512.pt`: GPT-XL, captions, 32×32 grid.
    pub fn t2i_xl_stage2() -> Self {
        Self::t2i_xl_stage1().with_block_size(1024)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }
    /// Side of the square token grid (16 for 256 tokens).
    pub fn grid_side(&self) -> usize {
        (self.block_size as f64).sqrt().round() as usize
    }
    /// Rows of the condition embedder table (`num_classes + 1`: the last one is the null class).
    pub fn class_rows(&self) -> usize {
        self.num_classes + 1
    }
    /// Rows of the RoPE table: condition rows, grid cells, extra zero rows.
    pub fn rope_rows(&self) -> usize {
        self.cls_token_num + self.block_size + self.extra_rope_rows
    }
    /// Number of trainable parameters (the t2i null-caption buffer is not counted).
    pub fn param_count(&self) -> usize {
        let (d, f, hd) = (self.dim, self.ffn_hidden, self.head_dim());
        let qkv = d * (self.n_head + 2 * self.n_kv_head) * hd;
        let layer = qkv + d * d + 3 * d * f + 2 * d;
        let cond = match self.model_type {
            ModelType::C2i => self.class_rows() * d,
            ModelType::T2i => self.caption_dim * d + d * d,
        };
        2 * self.vocab_size * d + d + cond + self.n_layer * layer
    }

    /// Checks the internal consistency of the configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("GPT config", msg));
        if self.dim == 0 || self.n_head == 0 || self.n_kv_head == 0 || self.n_layer == 0 {
            return bad("dim, n_layer, n_head and n_kv_head must be positive".into());
        }
        if !self.dim.is_multiple_of(self.n_head) {
            return bad(format!(
                "dim {} is not a multiple of n_head {}",
                self.dim, self.n_head
            ));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            ));
        }
        if !self.head_dim().is_multiple_of(4) {
            return bad(format!(
                "head_dim {} must be a multiple of 4 for 2D RoPE",
                self.head_dim()
            ));
        }
        let g = self.grid_side();
        if g * g != self.block_size || g == 0 {
            return bad(format!(
                "block_size {} is not a square number (use (image_size/16)^2)",
                self.block_size
            ));
        }
        if self.model_type == ModelType::T2i && self.cls_token_num > 120 {
            return bad(format!(
                "t2i cls_token_num {} exceeds 120",
                self.cls_token_num
            ));
        }
        if self.model_type == ModelType::C2i && self.cls_token_num == 0 {
            return bad("c2i cls_token_num must be at least 1".into());
        }
        Ok(())
    }

    /// Reads a LANTERN/HF-style `config.json` (`hidden_size`, `num_hidden_layers`, ...).
    /// A file written by [`Config::to_hf_json`] or holding this struct's own field names also works.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::load(path, format!("{e}; pass the model's config.json")))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::load(
                path,
                format!("not valid JSON ({e}); fix or re-export config.json"),
            )
        })?;
        Self::from_hf_value(&v).map_err(|msg| Error::load(path, msg))
    }

    /// Parses the JSON value of a HF-style `config.json`.
    pub fn from_hf_value(v: &serde_json::Value) -> std::result::Result<Self, String> {
        if v.get("dim").is_some() {
            return serde_json::from_value(v.clone()).map_err(|e| format!("bad config: {e}"));
        }
        let u = |k: &str| -> std::result::Result<usize, String> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| format!("config.json lacks integer field `{k}`; add it"))
        };
        let uo = |k: &str, d: usize| v.get(k).and_then(|x| x.as_u64()).map_or(d, |x| x as usize);
        let dim = u("hidden_size")?;
        let n_head = u("num_attention_heads")?;
        let input_type = v
            .get("input_type")
            .and_then(|x| x.as_str())
            .unwrap_or("t2i");
        let model_type = if input_type.starts_with("c2i") {
            ModelType::C2i
        } else {
            ModelType::T2i
        };
        let cfg = Self {
            dim,
            n_layer: u("num_hidden_layers")?,
            n_head,
            n_kv_head: uo("num_key_value_heads", n_head),
            vocab_size: u("vocab_size")?,
            ffn_hidden: uo("intermediate_size", default_ffn_hidden(dim)),
            rope_base: v
                .get("rope_base")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0) as f32,
            norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5),
            model_type,
            num_classes: uo("num_classes", 1000),
            caption_dim: uo("caption_dim", 2048),
            cls_token_num: uo(
                "cls_token_num",
                if model_type == ModelType::C2i { 1 } else { 120 },
            ),
            block_size: uo("block_size", if input_type == "t2i2" { 1024 } else { 256 }),
            extra_rope_rows: uo("extra_rope_rows", 10),
        };
        Ok(cfg)
    }

    /// HF-style `config.json` contents for this model (LANTERN's converted format).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_base": self.rope_base,
            "block_size": self.block_size,
            "cls_token_num": self.cls_token_num,
            "caption_dim": self.caption_dim,
            "num_classes": self.num_classes,
            "input_type": match self.model_type { ModelType::C2i => "c2i", ModelType::T2i => "t2i" },
            "extra_rope_rows": self.extra_rope_rows,
            "max_position_embeddings": find_multiple(self.cls_token_num + self.block_size + self.extra_rope_rows, 8),
            "attention_bias": false,
            "pretraining_tp": 1,
            "tie_word_embeddings": false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_size_table() {
        assert_eq!(Config::gpt_b().ffn_hidden, 2048);
        assert_eq!(Config::gpt_l().ffn_hidden, 2816);
        assert_eq!(Config::gpt_xl().ffn_hidden, 3584);
        assert_eq!(Config::gpt_xxl().ffn_hidden, 4096);
        assert_eq!(Config::gpt_3b().ffn_hidden, 8704);
        assert_eq!(Config::gpt_3b().head_dim(), 100);
        // Parameter counts from the spec's size table (millions, rounded).
        let m = |c: Config| (c.param_count() as f64 / 1e5).round() / 10.0;
        assert_eq!(m(Config::gpt_b()), 110.9);
        assert_eq!(m(Config::gpt_xl()), 774.7);
        assert_eq!(m(Config::gpt_3b()), 3096.7);
        assert_eq!(m(Config::t2i_xl_stage1()), 777.7);
        for c in [Config::gpt_b(), Config::gpt_3b(), Config::t2i_xl_stage2()] {
            c.validate().unwrap();
        }
        assert!(Config::gpt_b().with_block_size(250).validate().is_err());
    }

    #[test]
    fn hf_json_round_trip() {
        let c = Config::t2i_xl_stage1();
        let back = Config::from_hf_value(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.dim, 1280);
        assert_eq!(back.cls_token_num, 120);
    }
}
