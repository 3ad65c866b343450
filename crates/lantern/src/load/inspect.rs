//! What a checkpoint is: kind, implied configuration, parameter count and dtype.
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{open_weights, CheckpointFormat, LoadReport};
use crate::models::drafter::DrafterConfig;
use crate::models::llamagen::{Config, ModelType};
use crate::Result;

/// Kind of model a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// LlamaGen GPT; `hf` = LANTERN's HF-style names.
    LlamaGen { model_type: ModelType, hf: bool },
    /// LANTERN/EAGLE drafter.
    Drafter,
    /// VQ tokenizer.
    Vq,
    /// Anything else.
    Unknown,
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LlamaGen { model_type, hf } => write!(
                f,
                "LlamaGen {} GPT ({} names)",
                match model_type {
                    ModelType::C2i => "c2i",
                    ModelType::T2i => "t2i",
                },
                if *hf { "HF-style" } else { "original" }
            ),
            Self::Drafter => write!(f, "EAGLE drafter"),
            Self::Vq => write!(f, "VQ tokenizer"),
            Self::Unknown => write!(f, "unknown"),
        }
    }
}

/// Classifies stored tensor names.
pub fn classify(r: &LoadReport) -> CheckpointKind {
    let any = |p: &str| r.tensors.keys().any(|k| k.starts_with(p));
    let hf = r.has("model.embed_tokens.weight");
    if r.has("tok_embeddings.weight") || hf {
        let t2i = any("cls_embedding.cap_proj") || any("model.cls_embedding.cap_proj");
        let model_type = if t2i { ModelType::T2i } else { ModelType::C2i };
        return CheckpointKind::LlamaGen { model_type, hf };
    }
    if r.has("fc.weight") && r.has("layers.0.self_attn.q_proj.weight") {
        return CheckpointKind::Drafter;
    }
    if any("quantize.") || (any("encoder.") && any("decoder.")) {
        return CheckpointKind::Vq;
    }
    CheckpointKind::Unknown
}

/// Heads of the published sizes by width (head_dim 64 otherwise).
fn heads_for(dim: usize) -> usize {
    match dim {
        768 => 12,
        1024 => 16,
        1280 => 20,
        1536 => 24,
        2048 => 32,
        2560 => 40,
        3200 => 32,
        4096 => 32,
        d => (d / 64).max(1),
    }
}

/// The LlamaGen config implied by `config.json` or, failing that, by the tensor shapes and the
/// stored training args (`image_size`, `downsample_size`, `cls_token_num`); without args
/// block_size 256 is assumed. Head counts follow the published sizes (head_dim 64 otherwise).
pub fn implied_config(r: &LoadReport) -> std::result::Result<Config, String> {
    if let Some(v) = &r.config_json {
        return Config::from_hf_value(v);
    }
    let shape = |n: &str| {
        r.canonical_shape(n)
            .ok_or_else(|| format!("tensor `{n}` missing"))
    };
    let emb = shape("tok_embeddings.weight")?;
    let (vocab, dim) = (emb[0], emb[1]);
    let n_layer = (0..)
        .take_while(|i| {
            r.canonical_shape(&format!("layers.{i}.attention_norm.weight"))
                .is_some()
        })
        .count();
    let ffn = shape("layers.0.feed_forward.w1.weight")?[0];
    let n_head = heads_for(dim);
    let hd = dim / n_head;
    let qkv = shape("layers.0.attention.wqkv.weight")?[0];
    let n_kv_head = (qkv / hd).saturating_sub(n_head) / 2;
    let hf = r.has("model.embed_tokens.weight");
    let mut cfg = Config {
        dim,
        n_layer,
        n_head,
        n_kv_head,
        vocab_size: vocab,
        ffn_hidden: ffn,
        extra_rope_rows: if hf { 10 } else { 0 },
        ..Config::gpt_b()
    };
    if let Some(s) = r.canonical_shape("cls_embedding.embedding_table.weight") {
        cfg.num_classes = s[0].saturating_sub(1);
    } else if let Some(s) = r.canonical_shape("cls_embedding.cap_proj.fc1.weight") {
        cfg.model_type = ModelType::T2i;
        cfg.caption_dim = s[1];
        cfg.cls_token_num = 120;
    } else {
        return Err("no class or caption embedder found".into());
    }
    let arg = |k: &str| r.args.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    if let Some(size) = arg("image_size") {
        let side = size / arg("downsample_size").unwrap_or(16).max(1);
        cfg.block_size = side * side;
    }
    if let Some(n) = arg("cls_token_num") {
        cfg.cls_token_num = n;
    }
    Ok(cfg)
}

/// Facts about a checkpoint.
#[derive(Clone, Debug)]
pub struct CheckpointInfo {
    pub path: PathBuf,
    pub format: CheckpointFormat,
    pub kind: CheckpointKind,
    pub state_key: Option<String>,
    pub n_tensors: usize,
    pub n_params: usize,
    pub dtype: Option<DType>,
    /// Implied GPT config (LlamaGen checkpoints).
    pub config: Option<Config>,
    /// Drafter config from `config.json` (drafters).
    pub drafter: Option<DrafterConfig>,
    /// Scalar training args stored in the checkpoint.
    pub args: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Reads a checkpoint's metadata (no tensor data is loaded).
pub fn inspect(path: &Path) -> Result<CheckpointInfo> {
    let (_, r) = open_weights(path, DType::F32, &Device::Cpu)?;
    let kind = classify(&r);
    let config = match kind {
        CheckpointKind::LlamaGen { .. } => implied_config(&r).ok(),
        _ => None,
    };
    let drafter = match (&kind, &r.config_json) {
        (CheckpointKind::Drafter, Some(v)) => DrafterConfig::from_hf_value(v).ok(),
        _ => None,
    };
    Ok(CheckpointInfo {
        n_tensors: r.tensors.len(),
        n_params: r
            .tensors
            .values()
            .map(|(s, _)| s.iter().product::<usize>())
            .sum(),
        dtype: r.stored_dtype(),
        path: r.path.clone(),
        format: r.format,
        state_key: r.state_key.clone(),
        args: r.args.clone(),
        kind,
        config,
        drafter,
    })
}

impl fmt::Display for CheckpointInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file: {}", self.path.display())?;
        writeln!(f, "format: {:?}", self.format)?;
        writeln!(f, "kind: {}", self.kind)?;
        if let Some(k) = &self.state_key {
            writeln!(f, "state dict key: {k}")?;
        }
        writeln!(f, "tensors: {}", self.n_tensors)?;
        writeln!(
            f,
            "parameters: {} ({:.1}M)",
            self.n_params,
            self.n_params as f64 / 1e6
        )?;
        if let Some(d) = self.dtype {
            writeln!(f, "dtype: {d:?}")?;
        }
        if !self.args.is_empty() {
            let a: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(f, "training args: {}", a.join(" "))?;
        }
        if let Some(c) = &self.config {
            writeln!(
                f,
                "config: dim {} layers {} heads {} kv_heads {} ffn {} vocab {} cls_token_num {} block_size {} (block_size from config.json or training args, else assumed)",
                c.dim, c.n_layer, c.n_head, c.n_kv_head, c.ffn_hidden, c.vocab_size, c.cls_token_num, c.block_size
            )?;
        }
        if let Some(d) = &self.drafter {
            writeln!(
                f,
                "drafter: hidden {} heads {} ffn {} vocab {} input_type {}",
                d.hidden_size,
                d.num_attention_heads,
                d.intermediate_size,
                d.vocab_size,
                d.input_type
            )?;
        }
        Ok(())
    }
}
