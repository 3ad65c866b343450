//! The decoding traits on the real models: [`Target`] for [`LlamaGen`], [`DraftModel`] for the
//! EAGLE [`Drafter`], [`DecodeCache`] for [`KvCache`].
//!
//! - Condition: c2i class ids (the unconditional rows use the null class `num_classes`); t2i
//!   caption features and their mask (the unconditional rows use the checkpoint's null caption
//!   with the same mask, as LlamaGen and LANTERN do). The caption key-padding mask is stored in
//!   the cache ([`LlamaGenCache`]) and added to every forward: prefill, AR steps, tree blocks.
//! - Drafter positions: the loops pass drafter position `j` = target position `j` (the pair
//!   feature `j`, token `j + 1`). That token is image token `i = j + 1 - cls` (target `cls`
//!   condition positions), which must use grid cell `i`, i.e. drafter RoPE row
//!   `cls_d + i = j + (cls_d + 1 - cls)`. LANTERN's tables make the offset zero (t2i: target 120,
//!   drafter 119; c2i: target 1, drafter 0), so rows are used as given; [`check_drafter`]
//!   rejects any other pairing.
//! - Positions past a model's RoPE table (tree nodes beyond the last image token, which are
//!   never committed) reuse a fixed row: the target's condition row 0 (zero rotation), the
//!   drafter's last extra row (zero) or, without extra rows, its row 0.
use super::draft_graph::FixedDrafting;
use super::graph_step::GraphCache;
use super::model::{DecodeCache, DraftModel, Target, Visibility};
use super::{GenerateOptions, Output};
use crate::cache::KvCache;
use crate::models::drafter::Drafter;
use crate::models::llamagen::{
    caption_mask, key_padding_mask, AttnMask, Condition, LlamaGen, ModelType,
};
use crate::{Error, Result};
use candle_core::{DType, Tensor};

impl DecodeCache for KvCache {
    fn len(&self) -> usize {
        KvCache::len(self)
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        KvCache::truncate(self, len);
        Ok(())
    }

    fn keep(&mut self, start: usize, rows: &[Vec<usize>]) -> Result<()> {
        self.keep_rows(start, rows)
    }

    fn defer_commit(&mut self, on: bool) {
        KvCache::defer_commit(self, on)
    }
}

/// The target's KV cache (with its CUDA graphs on GPUs, [`GraphCache`]) plus, for t2i, the
/// caption validity of every batch row, which every forward turns into key padding.
#[derive(Debug)]
pub struct LlamaGenCache {
    cache: GraphCache,
    /// `[rows, cls_token_num]` f32, 1 = valid caption position (t2i only).
    valid: Option<Tensor>,
}

impl LlamaGenCache {
    /// The key/value buffers.
    pub fn kv(&self) -> &KvCache {
        self.cache.kv()
    }

    /// Caption validity `[rows, cls_token_num]` set by the prefill (t2i only).
    pub fn caption_valid(&self) -> Option<&Tensor> {
        self.valid.as_ref()
    }
}

impl DecodeCache for LlamaGenCache {
    fn len(&self) -> usize {
        self.cache.len()
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)
    }

    fn keep(&mut self, start: usize, rows: &[Vec<usize>]) -> Result<()> {
        self.cache.keep(start, rows)
    }

    fn defer_commit(&mut self, on: bool) {
        self.cache.defer_commit(on)
    }
}

/// The drafter's KV cache (with its CUDA graphs on GPUs).
pub type DrafterCache = GraphCache;

/// Replaces positions `>= rows` (past the RoPE table) with `zero_row`.
fn clamp_positions(positions: &Tensor, rows: usize, zero_row: usize) -> Result<Tensor> {
    Ok(crate::fused::clamp_rows(positions, rows, zero_row)?)
}

/// Converts the loop's visibility (`[rows, s, past + s]`) to the model mask, adding caption key
/// padding when `valid` is set.
fn attn_mask(
    vis: &Visibility,
    s: usize,
    past: usize,
    valid: Option<&Tensor>,
    dev: &candle_core::Device,
) -> Result<AttnMask> {
    Ok(match (vis, valid) {
        (Visibility::Causal, None) => AttnMask::Causal,
        (Visibility::Custom(m), None) => AttnMask::Custom(m.unsqueeze(1)?),
        (Visibility::Causal, Some(v)) => AttnMask::Custom(caption_mask(v, s, past, dev)?),
        (Visibility::Custom(m), Some(v)) => AttnMask::Custom(
            m.unsqueeze(1)?
                .broadcast_add(&key_padding_mask(v, past + s)?)?,
        ),
    })
}

impl Target for LlamaGen {
    type Condition = Condition;
    type Cache = LlamaGenCache;

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn block_size(&self) -> usize {
        self.config().block_size
    }

    fn cond_len(&self) -> usize {
        self.config().cls_token_num
    }

    fn num_images(&self, cond: &Condition) -> usize {
        match cond {
            Condition::Classes(ids) => ids.len(),
            Condition::Captions { features, .. } => features.dim(0).unwrap_or(0),
        }
    }

    fn new_cache(&self, rows: usize, max_len: usize) -> Result<LlamaGenCache> {
        let cache = GraphCache::new(self.embeddings_id(), self.device(), rows, max_len, || {
            LlamaGen::new_cache(self, rows, max_len)
        })?;
        Ok(LlamaGenCache { cache, valid: None })
    }

    fn prefill(
        &self,
        cond: &Condition,
        with_uncond: bool,
        cache: &mut LlamaGenCache,
    ) -> Result<Tensor> {
        if !cache.cache.kv().is_empty() {
            return Err(Error::invalid(
                "KV cache",
                "prefill needs an empty cache (create a new one per generation)",
            ));
        }
        let cfg = self.config();
        let cls = cfg.cls_token_num;
        let dev = self.device().clone();
        match (cond, cfg.model_type) {
            (Condition::Classes(_), ModelType::T2i) => {
                return Err(Error::invalid(
                    "condition",
                    "class ids given to a text-conditional (t2i) model; pass caption features",
                ))
            }
            (Condition::Captions { .. }, ModelType::C2i) => {
                return Err(Error::invalid(
                    "condition",
                    "caption features given to a class-conditional (c2i) model; pass class ids",
                ))
            }
            _ => {}
        }
        let (x, valid) = match cond {
            Condition::Classes(ids) => {
                let mut all = ids.clone();
                if with_uncond {
                    all.extend(std::iter::repeat_n(cfg.num_classes as u32, ids.len()));
                }
                (self.embed_condition(&Condition::Classes(all))?, None)
            }
            Condition::Captions { features, mask } => {
                let (n, n_cap, _) = features.dims3()?;
                if mask.dims() != [n, n_cap] {
                    return Err(Error::invalid(
                        "caption mask",
                        format!(
                            "shape {:?} for features {:?}; pass one 0/1 entry per caption row [b, {n_cap}]",
                            mask.dims(),
                            features.dims()
                        ),
                    ));
                }
                let (f, m) = if with_uncond {
                    let u = self.uncond_caption(n)?.to_dtype(features.dtype())?;
                    (
                        Tensor::cat(&[features, &u], 0)?,
                        Tensor::cat(&[mask, mask], 0)?,
                    )
                } else {
                    (features.clone(), mask.clone())
                };
                let x = self.embed_condition(&Condition::Captions {
                    features: f,
                    mask: m.clone(),
                })?;
                let valid = m
                    .to_dtype(DType::F32)?
                    .narrow(1, 0, cls.min(n_cap))?
                    .to_device(&dev)?;
                (x, Some(valid))
            }
        };
        let pos = Tensor::arange(0u32, cls as u32, &dev)?;
        let mask = match &valid {
            Some(v) => AttnMask::Custom(caption_mask(v, cls, 0, &dev)?),
            None => AttnMask::Causal,
        };
        let h = self.forward(&x, &pos, &mask, cache.cache.kv_mut())?;
        cache.valid = valid;
        Ok(h)
    }

    fn forward_tokens(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        vis: &Visibility,
        cache: &mut LlamaGenCache,
    ) -> Result<Tensor> {
        let (rows, s) = tokens.dims2()?;
        if let Some(v) = &cache.valid {
            if v.dim(0)? != rows {
                return Err(Error::invalid(
                    "KV cache",
                    format!(
                        "prefilled for {} rows, step has {rows} (internal error)",
                        v.dim(0)?
                    ),
                ));
            }
        }
        let dev = self.device().clone();
        let past = cache.cache.kv().len();
        let mask = attn_mask(vis, s, past, cache.valid.as_ref(), &dev)?;
        super::profile::mark_here("target step: attention mask (built on the host)")?;
        // The condition rows (cls >= 1) have zero rotation: row 0 serves past-the-table nodes.
        let pos = clamp_positions(positions, self.config().rope_rows(), 0)?;
        let m = match &mask {
            AttnMask::Custom(m) => Some(m),
            AttnMask::Causal => None,
        };
        if let Some(h) = cache.cache.try_fixed(self, tokens, None, &pos, m)? {
            return Ok(h);
        }
        let x = self.embed_tokens(tokens)?;
        self.forward(&x, &pos, &mask, cache.cache.kv_mut())
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        LlamaGen::lm_head(self, hidden)
    }
    fn lm_head_raw(&self, hidden: &Tensor) -> Result<Tensor> {
        LlamaGen::lm_head_raw(self, hidden)
    }

    fn lm_head_id(&self) -> Option<candle_core::TensorId> {
        Some(LlamaGen::lm_head_id(self))
    }
}

impl DraftModel for Drafter {
    type Cache = DrafterCache;

    fn new_cache(&self, rows: usize, max_len: usize) -> Result<DrafterCache> {
        GraphCache::new(self.embeddings_id(), self.device(), rows, max_len, || {
            Drafter::new_cache(self, rows, max_len)
        })
    }

    /// Drafter positions are the loop's positions (see the module docs for the mapping); the
    /// drafter masks no caption padding (LANTERN's drafter attends to every position).
    fn forward(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
        vis: &Visibility,
        cache: &mut DrafterCache,
    ) -> Result<Tensor> {
        let (rows, zero_row) = self.rope_clamp();
        let pos = clamp_positions(positions, rows, zero_row)?;
        let m = match vis {
            Visibility::Custom(m) => Some(m.unsqueeze(1)?),
            Visibility::Causal => None,
        };
        if let Some(h) = cache.try_fixed(self, ids, Some(features), &pos, m.as_ref())? {
            return Ok(h);
        }
        let mask = match m {
            None => AttnMask::Causal,
            Some(m) => AttnMask::Custom(m),
        };
        Drafter::forward(self, ids, features, &pos, &mask, cache.kv_mut())
    }

    fn fixed_drafting<'a>(&'a self, cache: &'a mut DrafterCache) -> Option<FixedDrafting<'a>> {
        let (rope_rows, zero_row) = self.rope_clamp();
        let (kv, graphs, dynamic, capture) = cache.fixed_drafting()?;
        Some(FixedDrafting {
            model: self,
            kv,
            graphs,
            dynamic,
            capture,
            rope_rows,
            zero_row,
        })
    }
}

/// Checks that `drafter` fits `target`: width, vocabulary, grid ([`Drafter::check_target`]) and
/// the RoPE alignment of the module docs (drafter `cls_token_num` = target's − 1).
pub fn check_drafter(target: &LlamaGen, drafter: &Drafter) -> Result<()> {
    drafter.check_target(target.config())?;
    let (t, d) = (
        target.config().cls_token_num,
        drafter.config().cls_token_num,
    );
    if d + 1 != t {
        return Err(Error::invalid(
            "drafter",
            format!(
                "RoPE offset {d} does not fit a target with {t} condition positions (needs {}); \
                 use input_type t2i for caption models, c2i for class models",
                t.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

/// [`super::generate`] for LlamaGen with the checks of [`check_drafter`] first.
pub fn generate(
    target: &LlamaGen,
    drafter: Option<&Drafter>,
    cond: &Condition,
    opts: &GenerateOptions,
) -> Result<Output> {
    if let Some(d) = drafter {
        check_drafter(target, d)?;
    }
    super::generate(target, drafter, cond, opts)
}
