//! flan-T5 text encoder for LlamaGen text-to-image models, on candle-transformers' T5.
//!
//! LlamaGen tokenises cleaned captions to 120 tokens (EOS included, right padding), runs the
//! T5 encoder with the padding mask, then moves the valid rows to the end of a zero buffer
//! ("left padding", `llamagen-spec.md` §1.4, §3.1). candle's T5 encoder has no padding mask, so
//! each caption is encoded on its valid tokens alone: with a key-padding mask, padded keys
//! contribute nothing and T5's relative position bias depends only on offsets, so the valid rows
//! are exactly those of the padded run; padded rows are discarded by left padding anyway.
use crate::models::caption::clean_caption;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5;
use std::path::{Path, PathBuf};

/// Caption length LlamaGen's t2i models are trained with.
pub const MAX_CAPTION_TOKENS: usize = 120;

/// A flan-T5 encoder with its tokenizer, loaded from a Hugging Face folder.
pub struct TextEncoder {
    model: t5::T5EncoderModel,
    tokenizer: tokenizers::Tokenizer,
    d_model: usize,
    device: Device,
    /// Apply LlamaGen's `clean_caption` (twice) before tokenising.
    pub clean: bool,
    /// Truncate captions longer than [`MAX_CAPTION_TOKENS`] (keeping EOS) instead of failing.
    pub truncate: bool,
}

/// Encoded captions, ready for the GPT's caption embedder.
pub struct EncodedCaptions {
    /// `[b, 120, d_model]` f32, valid rows at the end, padded rows exactly zero.
    pub features: Tensor,
    /// `[b, 120]` u8, 1 for valid (left-padded) positions.
    pub mask: Tensor,
    /// Valid tokens per caption (EOS included).
    pub lengths: Vec<usize>,
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::load(&index, format!("not valid JSON: {e}")))?;
        let mut files: Vec<String> = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::load(&index, "no `weight_map` in the index"))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(Error::load(
        dir,
        "no model.safetensors or model.safetensors.index.json: point --t5 at a flan-t5 folder in Hugging Face layout",
    ))
}

impl TextEncoder {
    /// Loads `config.json`, `tokenizer.json` and the safetensors weights from `dir`. The encoder
    /// runs in `dtype` (LlamaGen uses bf16); outputs are returned in f32.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::load(&cfg_path, format!("{e} (expected a flan-t5 folder)")))?;
        let cfg: t5::Config = serde_json::from_str(&text)
            .map_err(|e| Error::load(&cfg_path, format!("not a T5 config: {e}")))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::load(&tok_path, format!("cannot read the tokenizer: {e}")))?;
        let files = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only and not modified while in use.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|e| Error::load(dir, format!("cannot map the weights: {e}")))?;
        let model = t5::T5EncoderModel::load(vb, &cfg)
            .map_err(|e| Error::load(dir, format!("not a T5 encoder checkpoint: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            d_model: cfg.d_model,
            device: device.clone(),
            clean: true,
            truncate: false,
        })
    }

    /// Width of the encoder output (2048 for flan-t5-xl).
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Token ids of one caption as LlamaGen tokenises it (cleaned, EOS appended, at most 120).
    pub fn tokenize(&self, caption: &str) -> Result<Vec<u32>> {
        let text = if self.clean {
            clean_caption(caption)
        } else {
            caption.to_string()
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| Error::invalid("prompt", format!("cannot tokenise: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > MAX_CAPTION_TOKENS {
            if !self.truncate {
                return Err(Error::invalid(
                    "prompt",
                    format!(
                        "{} tokens after cleaning, the model takes at most {MAX_CAPTION_TOKENS}: shorten it or pass --truncate-prompts",
                        ids.len()
                    ),
                ));
            }
            let eos = *ids.last().unwrap_or(&1);
            ids.truncate(MAX_CAPTION_TOKENS);
            ids[MAX_CAPTION_TOKENS - 1] = eos;
        }
        Ok(ids)
    }

    /// Encodes captions into left-padded features and mask (`llamagen-spec.md` §1.4).
    pub fn encode(&mut self, captions: &[String]) -> Result<EncodedCaptions> {
        let mut rows = Vec::with_capacity(captions.len());
        let mut masks = Vec::with_capacity(captions.len());
        let mut lengths = Vec::with_capacity(captions.len());
        for caption in captions {
            let ids = self.tokenize(caption)?;
            let n = ids.len();
            let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            self.model.clear_kv_cache();
            let h = self
                .model
                .forward(&input)?
                .to_dtype(DType::F32)?
                .squeeze(0)?;
            let pad = Tensor::zeros(
                (MAX_CAPTION_TOKENS - n, self.d_model),
                DType::F32,
                &self.device,
            )?;
            rows.push(Tensor::cat(&[&pad, &h], 0)?);
            let mut m = vec![0u8; MAX_CAPTION_TOKENS];
            m[MAX_CAPTION_TOKENS - n..].iter_mut().for_each(|x| *x = 1);
            masks.push(Tensor::new(m.as_slice(), &self.device)?);
            lengths.push(n);
        }
        Ok(EncodedCaptions {
            features: Tensor::stack(&rows, 0)?,
            mask: Tensor::stack(&masks, 0)?,
            lengths,
        })
    }
}
