//! Condition embedders (spec §1.3 step 1): the c2i class table (last row = null class) and the
//! t2i caption projection `fc2(gelu_tanh(fc1(x)))` with its fixed `uncond_embedding` buffer.
use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};

use super::config::{Config, ModelType};

/// Number of caption positions of LlamaGen's T5 features.
pub const CAPTION_LEN: usize = 120;

/// Class or caption embedder, loaded under `cls_embedding`.
#[derive(Clone, Debug)]
pub enum CondEmbedder {
    /// `embedding_table` `[num_classes + 1, dim]`.
    Class {
        table: Embedding,
        num_classes: usize,
    },
    /// `cap_proj.fc1` `[dim, caption_dim]`, `cap_proj.fc2` `[dim, dim]`, `uncond_embedding`
    /// `[120, caption_dim]`.
    Caption {
        fc1: Linear,
        fc2: Linear,
        uncond: Tensor,
    },
}

impl CondEmbedder {
    /// Loads the embedder matching `cfg.model_type`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        match cfg.model_type {
            ModelType::C2i => Ok(Self::Class {
                table: embedding(cfg.class_rows(), cfg.dim, vb.pp("embedding_table"))?,
                num_classes: cfg.num_classes,
            }),
            ModelType::T2i => {
                let cp = vb.pp("cap_proj");
                Ok(Self::Caption {
                    fc1: linear_no_bias(cfg.caption_dim, cfg.dim, cp.pp("fc1"))?,
                    fc2: linear_no_bias(cfg.dim, cfg.dim, cp.pp("fc2"))?,
                    uncond: vb.get_with_hints(
                        (CAPTION_LEN, cfg.caption_dim),
                        "uncond_embedding",
                        candle_nn::Init::Randn {
                            mean: 0.0,
                            stdev: 1.0 / (cfg.caption_dim as f64).sqrt(),
                        },
                    )?,
                })
            }
        }
    }

    /// Class ids `[b]` (u32) → `[b, 1, dim]`; id `num_classes` is the null class.
    pub fn classes(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Class { table, num_classes } => {
                if let Some(bad) = ids.iter().find(|&&i| i as usize > *num_classes) {
                    candle_core::bail!(
                        "class id {bad} out of range: use 0..{num_classes} ({num_classes} = unconditional)"
                    );
                }
                let t = Tensor::new(ids, table.embeddings().device())?;
                table.forward(&t)?.unsqueeze(1)
            }
            Self::Caption { .. } => {
                candle_core::bail!("a t2i model needs caption features, not class ids")
            }
        }
    }

    /// Caption features `[b, n, caption_dim]` → `[b, n, dim]`.
    pub fn captions(&self, features: &Tensor) -> Result<Tensor> {
        match self {
            Self::Caption { fc1, fc2, .. } => {
                let x = features.to_dtype(fc1.weight().dtype())?;
                fc2.forward(&fc1.forward(&x)?.gelu()?)
            }
            Self::Class { .. } => {
                candle_core::bail!("a c2i model needs class ids, not caption features")
            }
        }
    }

    /// The null caption `[b, 120, caption_dim]` (t2i only).
    pub fn uncond_caption(&self, b: usize) -> Result<Tensor> {
        match self {
            Self::Caption { uncond, .. } => uncond.unsqueeze(0)?.repeat((b, 1, 1)),
            Self::Class { .. } => candle_core::bail!("c2i models use the null class id instead"),
        }
    }
}
