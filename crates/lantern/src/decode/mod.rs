//! Decoding: plain AR and speculative loops, draft trees.
pub mod tree;
