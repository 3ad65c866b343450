//! Training loops for the models lantern ships, on candle (CPU or CUDA).
pub mod export;
pub mod gpt;

pub use export::save_varmap_f16;
pub use gpt::{train_gpt, GptTrainConfig};
