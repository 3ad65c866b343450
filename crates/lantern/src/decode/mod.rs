//! Decoding: plain AR and speculative loops, draft trees.
//!
//! Entry point: [`generate`] with [`GenerateOptions`]. The loops run on the [`model::Target`]
//! and [`model::DraftModel`] traits.
pub mod ar;
pub mod draft;
pub mod draft_graph;
pub mod dynamic;
pub mod dynamic_graph;
pub mod feed;
pub mod graph_step;
pub mod level;
pub mod llamagen;
pub mod model;
pub mod profile;
mod slots;
pub mod speculative;
pub mod static_trees;
pub mod stats;
#[cfg(test)]
mod test_util;
pub mod tree;

pub use self::static_trees::{DynamicParams, TreeShape, TreeSpec};
pub use self::stats::DecodeStats;
pub use crate::accept::{AcceptConfig, Neighbors, Relaxation, Residual};

use self::model::{DraftModel, Target};
use crate::sampling::{cfg_mix, SamplingParams};
use crate::{Error, Result};
use candle_core::Tensor;

/// How tokens are produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Decoding {
    /// One target forward per token.
    #[default]
    Ar,
    /// Draft a tree with the drafter, verify it in one target forward.
    Speculative {
        /// Tree built every step.
        tree: TreeSpec,
        /// Acceptance rule settings.
        accept: AcceptConfig,
        /// Latent-neighbour table for relaxed (LANTERN) acceptance.
        neighbors: Option<std::sync::Arc<Neighbors>>,
    },
}

/// Options of one [`generate`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// CFG scale (`1.0` = no unconditional half).
    pub cfg_scale: f32,
    /// Temperature / top-k / top-p of the target (and drafter) distributions.
    pub sampling: SamplingParams,
    /// Seed; image g uses `seed + g`.
    pub seed: u64,
    /// AR or speculative.
    pub decoding: Decoding,
    /// Stop after this many tokens instead of the model's `block_size`.
    pub max_tokens: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl GenerateOptions {
    /// Defaults: CFG 4.0, temperature 1, no filters, seed 0, AR decoding.
    pub fn new() -> Self {
        Self {
            cfg_scale: 4.0,
            sampling: SamplingParams::default(),
            seed: 0,
            decoding: Decoding::Ar,
            max_tokens: None,
        }
    }
    /// Sets the CFG scale.
    pub fn with_cfg_scale(mut self, s: f32) -> Self {
        self.cfg_scale = s;
        self
    }
    /// Sets the sampling parameters.
    pub fn with_sampling(mut self, s: SamplingParams) -> Self {
        self.sampling = s;
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Sets the decoding mode.
    pub fn with_decoding(mut self, d: Decoding) -> Self {
        self.decoding = d;
        self
    }
    /// Generates only the first `n` tokens of each image.
    pub fn with_max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if !self.cfg_scale.is_finite() {
            return Err(Error::invalid(
                "cfg scale",
                format!("{} (use a finite value; 1 = no guidance)", self.cfg_scale),
            ));
        }
        if let Decoding::Speculative { tree, .. } = &self.decoding {
            tree.validate()?;
        }
        Ok(())
    }

    /// Whether the batch carries unconditional rows.
    pub fn uses_cfg(&self) -> bool {
        self.cfg_scale != 1.0
    }
}

/// Generated tokens and statistics, one entry per image.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Image tokens of every image.
    pub tokens: Vec<Vec<u32>>,
    /// Statistics of every image.
    pub stats: Vec<DecodeStats>,
}

/// Generates image tokens for every image of `cond`. `drafter` is needed for speculative
/// decoding.
pub fn generate<T: Target, D: DraftModel>(
    target: &T,
    drafter: Option<&D>,
    cond: &T::Condition,
    opts: &GenerateOptions,
) -> Result<Output> {
    opts.validate()?;
    match &opts.decoding {
        Decoding::Ar => ar::generate_ar(target, cond, opts),
        Decoding::Speculative {
            tree,
            accept,
            neighbors,
        } => {
            let drafter = drafter.ok_or_else(|| {
                Error::invalid(
                    "decoding",
                    "speculative decoding needs a drafter (load one, or choose AR decoding)",
                )
            })?;
            speculative::generate_speculative(
                target,
                drafter,
                cond,
                opts,
                tree,
                accept,
                neighbors.as_deref(),
            )
        }
    }
}

/// Number of tokens to generate per image.
pub(crate) fn token_budget<T: Target>(target: &T, opts: &GenerateOptions) -> Result<usize> {
    if target.cond_len() == 0 {
        return Err(Error::invalid(
            "model",
            "cond_len 0 (the condition must occupy at least one position)",
        ));
    }
    let n = opts
        .max_tokens
        .map_or(target.block_size(), |m| m.min(target.block_size()));
    if n == 0 {
        return Err(Error::invalid(
            "max tokens",
            "0 (generate at least one token)",
        ));
    }
    Ok(n)
}

/// The elements of an f32 tensor on the host, in one transfer of exactly those elements.
///
/// Candle's `to_vec*` of a GPU tensor copies its whole storage to the host before slicing, so a
/// view (a row, a column) of a large block would move the block: a contiguous f32 view on a
/// GPU is copied straight from its element range ([`crate::fused::contiguous_f32_to_host`]),
/// any other view is first copied to its own storage on the device.
pub(crate) fn to_host_f32(t: &Tensor) -> Result<Vec<f32>> {
    if let Some(v) = crate::fused::contiguous_f32_to_host(t)? {
        return Ok(v);
    }
    Ok(t.force_contiguous()?.flatten_all()?.to_vec1()?)
}

/// CFG-combined f32 logits of every image at sequence index `pos` of a `[rows, s, V]` logits
/// tensor (image g: rows `g` and `n + g` when `cfg`), in one device transfer.
pub(crate) fn cfg_rows(
    logits: &Tensor,
    n_img: usize,
    pos: usize,
    cfg: Option<f32>,
) -> Result<Vec<Vec<f32>>> {
    let (rows, _, v) = logits.dims3()?;
    let need = if cfg.is_some() { 2 * n_img } else { n_img };
    if rows < need {
        return Err(Error::invalid(
            "logits",
            format!("{rows} rows for {n_img} images (internal error)"),
        ));
    }
    let col = to_host_f32(&logits.narrow(1, pos, 1)?)?;
    let row = |r: usize| &col[r * v..(r + 1) * v];
    Ok((0..n_img)
        .map(|g| match cfg {
            Some(s) => cfg_mix(row(g), row(n_img + g), s),
            None => row(g).to_vec(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    #[test]
    fn cfg_rows_mix_each_image_at_one_position() -> Result<()> {
        // [rows 4, s 2, V 3]: images 0 and 1, conditional rows first
        let t = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((4, 2, 3))?;
        let row = |r: usize| -> Result<Vec<f32>> { Ok(t.i((r, 1))?.to_vec1()?) };
        let mixed = cfg_rows(&t, 2, 1, Some(2.0))?;
        assert_eq!(mixed[0], cfg_mix(&row(0)?, &row(2)?, 2.0));
        assert_eq!(mixed[1], cfg_mix(&row(1)?, &row(3)?, 2.0));
        assert_eq!(cfg_rows(&t, 2, 1, None)?, vec![row(0)?, row(1)?]);
        assert!(cfg_rows(&t, 3, 0, Some(2.0)).is_err());
        Ok(())
    }
}
