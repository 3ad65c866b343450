//! Model implementations: the LlamaGen GPT (c2i and t2i), the EAGLE drafter, the VQ tokenizer
//! and the flan-T5 text encoder.
pub mod vq;
