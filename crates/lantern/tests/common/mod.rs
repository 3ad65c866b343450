//! Loaders of the tiny LlamaGen / drafter fixtures in `tests/fixtures/gpt` (written by
//! `tests/fixtures/make_gpt_fixtures.py`), shared by the golden, loading and decoding tests.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lantern::load::{load_drafter, load_llamagen};
use lantern::models::drafter::{Drafter, DrafterConfig};
use lantern::models::llamagen::{Config, LlamaGen, ModelType};

/// The GPT fixture folder (`LANTERN_FIXTURES` overrides it, e.g. for a test binary copied to
/// a GPU machine).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("LANTERN_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt"),
    }
}

/// The reference outputs (`expected.safetensors`) by name.
pub fn expected() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixtures().join("expected.safetensors"),
        &Device::Cpu,
    )?)
}

/// Config of the class-conditional fixture `c2i.pt`.
pub fn tiny_c2i() -> Config {
    Config {
        dim: 32,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 2,
        vocab_size: 64,
        ffn_hidden: 64,
        num_classes: 10,
        block_size: 16,
        ..Config::gpt_b()
    }
}

/// Config of the text-conditional fixture `t2i.pt` (grouped-query attention, 120 caption rows).
pub fn tiny_t2i() -> Config {
    Config {
        n_kv_head: 1,
        model_type: ModelType::T2i,
        caption_dim: 32,
        cls_token_num: 120,
        ..tiny_c2i()
    }
}

/// The c2i fixture (`c2i.pt`) in `dtype` on the CPU.
pub fn load_c2i(dtype: DType) -> Result<LlamaGen> {
    Ok(load_llamagen(
        &fixtures().join("c2i.pt"),
        Some(&tiny_c2i()),
        dtype,
        &Device::Cpu,
    )?
    .0)
}

/// The c2i fixture in f32.
pub fn c2i() -> Result<LlamaGen> {
    load_c2i(DType::F32)
}

/// The t2i fixture in the HF folder format (`t2i_hf`, config from its `config.json`), f32.
pub fn t2i() -> Result<LlamaGen> {
    Ok(load_llamagen(&fixtures().join("t2i_hf"), None, DType::F32, &Device::Cpu)?.0)
}

/// The t2i fixture as a torch checkpoint (`t2i.pt` with [`tiny_t2i`]), f32.
pub fn t2i_pt() -> Result<LlamaGen> {
    Ok(load_llamagen(
        &fixtures().join("t2i.pt"),
        Some(&tiny_t2i()),
        DType::F32,
        &Device::Cpu,
    )?
    .0)
}

/// The fixture drafter (trained layout t2i; `c2i` reloads its weights with the c2i RoPE table).
pub fn fixture_drafter(c2i: bool) -> Result<Drafter> {
    let mut cfg = DrafterConfig::from_hf_json(&fixtures().join("drafter/config.json"))?;
    if c2i {
        cfg.cls_token_num = 0;
        cfg.input_type = "c2i".into();
    }
    Ok(load_drafter(
        &fixtures().join("drafter"),
        Some(&cfg),
        DType::F32,
        &Device::Cpu,
    )?
    .0)
}

/// max |a - b|, compared in f32 (0 exactly when the tensors are equal, bit for bit up to the
/// sign of zero).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

/// max |a - b| / max |b|, both compared in f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = b
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok(max_abs_diff(a, b)? / scale.max(1e-12))
}
