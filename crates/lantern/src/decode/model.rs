//! The operations the decoding loops need from a target model, a drafter and their caches.
//!
//! The loops are written against these traits so that they can be tested on tiny mock models;
//! `LlamaGen` and the EAGLE drafter implement them. Batch layout everywhere: with CFG, rows
//! `0..n` are the conditional halves of images `0..n` and rows `n..2n` the unconditional ones;
//! without CFG there are `n` rows.
use crate::Result;
use candle_core::Tensor;

/// Which keys the new positions of a forward may attend to.
#[derive(Debug, Clone)]
pub enum Visibility {
    /// Every past entry plus causal attention among the new positions.
    Causal,
    /// Additive f32 mask `[rows, s, past + s]` (0 = visible, `-inf` = hidden) over every key.
    /// The model adds whatever it masks on its own (caption padding columns).
    Custom(Tensor),
}

/// A KV cache as the loops use it.
pub trait DecodeCache {
    /// Number of filled positions (the same for every batch row; the speculative loop tracks
    /// which of them are valid per row).
    fn len(&self) -> usize;
    /// Whether the cache is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops every entry from `len` on.
    fn truncate(&mut self, len: usize) -> Result<()>;
    /// Compacts tree entries: for batch row `r`, entry `start + rows[r][i]` moves to
    /// `start + i`; afterwards `len = start + rows[r].len()` (all lists have one length).
    fn keep(&mut self, start: usize, rows: &[Vec<usize>]) -> Result<()>;
    /// Whether a fixed-shape step leaves its block at the staging slots until the next
    /// [`DecodeCache::keep`] gathers the kept entries from there
    /// ([`crate::cache::KvCache::defer_commit`]); caches without staging ignore it.
    fn defer_commit(&mut self, _on: bool) {}
}

/// A visual AR target model (LlamaGen) as the decoding loops use it.
pub trait Target {
    /// The generation condition (class labels or caption features), `n` images.
    type Condition;
    /// The model's KV cache.
    type Cache: DecodeCache;

    /// Vocabulary size (VQ codebook size).
    fn vocab_size(&self) -> usize;
    /// Image tokens per image (`block_size`).
    fn block_size(&self) -> usize;
    /// Number of condition positions (`cls_token_num`).
    fn cond_len(&self) -> usize;
    /// Number of images described by `cond`.
    fn num_images(&self, cond: &Self::Condition) -> usize;
    /// A cache for `rows` batch rows and `max_len` positions.
    fn new_cache(&self, rows: usize, max_len: usize) -> Result<Self::Cache>;
    /// Runs the condition positions `0..cond_len` (plus the null condition rows when
    /// `with_uncond`) into an empty cache.
    ///
    /// # Shapes
    /// returns post-norm hidden `[rows, cond_len, d]`
    fn prefill(
        &self,
        cond: &Self::Condition,
        with_uncond: bool,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;
    /// Embeds `tokens` and runs them at rope `positions`, appending them to the cache.
    ///
    /// # Shapes
    /// - `tokens`: `[rows, s]` u32, `positions`: `[s]` (shared) or `[rows, s]` (per row) u32
    /// - returns hidden `[rows, s, d]`
    fn forward_tokens(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        vis: &Visibility,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;
    /// Output head: `[.., d]` hidden to f32 logits `[.., vocab]`.
    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor>;
    /// Output head before [`Self::lm_head`]'s cast to f32: logits in the model's dtype (the
    /// probability kernels read bf16 and f16 rows as they are, one cast kernel fewer; their
    /// f32 values are exactly `lm_head`'s). Default: `lm_head`.
    fn lm_head_raw(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head(hidden)
    }
    /// Id of the output head's weights, where whole-tree drafting computations may read the
    /// head ([`super::draft_graph`]); `None` (the default) keeps drafting level by level.
    fn lm_head_id(&self) -> Option<candle_core::TensorId> {
        None
    }
}

/// An EAGLE-style drafter: consumes (target feature, next token) pairs and predicts the next
/// feature, read out through the target's `lm_head`.
pub trait DraftModel {
    /// The drafter's KV cache.
    type Cache: DecodeCache;

    /// A cache for `rows` batch rows and `max_len` positions.
    fn new_cache(&self, rows: usize, max_len: usize) -> Result<Self::Cache>;
    /// Drafter position `j` holds (feature of target position `j`, token at target position
    /// `j + 1`); `positions` are those `j`.
    ///
    /// # Shapes
    /// - `ids`: `[rows, s]` u32, `features`: `[rows, s, d]`, `positions`: `[s]` (shared) or
    ///   `[rows, s]` (per row) u32
    /// - returns drafter features `[rows, s, d]` (feed them to the target's `lm_head`)
    fn forward(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
        vis: &Visibility,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;
    /// The drafter's side of whole-tree drafting ([`super::draft_graph`]) with `cache`, where
    /// it has one; `None` (the default) keeps drafting level by level.
    fn fixed_drafting<'a>(
        &'a self,
        cache: &'a mut Self::Cache,
    ) -> Option<super::draft_graph::FixedDrafting<'a>> {
        let _ = cache;
        None
    }
}
