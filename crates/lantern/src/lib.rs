//! # lantern
//!
//! Fast autoregressive image generation for LlamaGen-family visual AR models, with lossless
//! speculative decoding (EAGLE-2 dynamic and static draft trees) and LANTERN / LANTERN++ relaxed
//! acceptance over VQ latent neighbourhoods.
//!
//! Layout: [`models`] (GPT, drafter, VQ tokenizer, T5), [`cache`] (KV caches), [`sampling`]
//! (CFG and LlamaGen's sampling filters), [`accept`] (acceptance rules and proximity tables),
//! [`decode`] (AR and speculative loops, draft trees), [`load`] (checkpoint readers),
//! [`data`] (training data readers), [`train`] (training loops), [`image`] (PNG output).
#![deny(rustdoc::broken_intra_doc_links)]

pub mod accept;
pub mod bench;
pub mod bundle;
pub mod cache;
pub mod data;
pub mod decode;
pub mod error;
pub mod eval;
pub mod fused;
pub mod image;
pub mod load;
pub mod models;
pub mod sampling;
pub mod train;

pub use error::{Error, Result};
