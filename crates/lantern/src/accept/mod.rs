//! Acceptance of drafted tokens: the standard (lossless) speculative-sampling rule, LANTERN's
//! relaxed acceptance over VQ latent neighbourhoods (additive TVD budget `delta`) and
//! LANTERN++'s multiplicative bound `lambda`, plus the latent proximity tables they use.
//!
//! - [`proximity`]: `V x k` nearest-neighbour tables ([`Neighbors`]), built from a codebook or
//!   imported from the official `.npy`, saved as safetensors.
//! - [`rules`]: the per-draft rules as plain functions over probability rows.
//! - [`tree`]: [`accept_tree`], the driver that walks a verified [`crate::decode::tree::DraftTree`]
//!   (sampled sibling chains in fused passes over the rows: `walk.rs`).
//!
//! Guarantees (see [`Residual`]): with the standard residual, deterministic drafts and LANTERN,
//! each emitted position is sampled from a distribution within `delta` TVD of the target;
//! with LANTERN++ the effective distribution is at most `lambda * p` pointwise. `delta = 0` and
//! `lambda = 1` make the same decisions as the exact rule for the same random draws.
mod npy;
pub mod proximity;
pub mod rules;
pub mod tree;
mod walk;

pub use proximity::{codebook_fingerprint, Metric, Neighbors};
pub use rules::{absorbed_mass, greedy_accepts, Relaxation, Residual};
pub use tree::{
    accept_tree, sibling_chain, AcceptConfig, SiblingChain, TargetRows, TreeDecision, TvdStats,
};
