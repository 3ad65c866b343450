//! Training loops for the models lantern ships, on candle (CPU or CUDA).
pub mod export;

pub use export::save_varmap_f16;
