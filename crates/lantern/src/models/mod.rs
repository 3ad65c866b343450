//! Model implementations: the LlamaGen GPT (c2i and t2i), the EAGLE drafter, the VQ tokenizer
//! and the flan-T5 text encoder.
pub mod caption;
pub mod drafter;
pub mod llamagen;
pub mod t5;
pub mod vq;
