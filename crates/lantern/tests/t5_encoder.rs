//! flan-T5 encoder wrapper against Hugging Face transformers on a tiny random checkpoint
//! (fixtures written by `tests/fixtures/make_t5_fixtures.py`).
use candle_core::{DType, Device, Tensor};
use lantern::models::t5::{TextEncoder, MAX_CAPTION_TOKENS};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5")
}

#[test]
fn t5_matches_transformers_with_llamagen_left_padding() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut enc = TextEncoder::load(&fixture(), DType::F32, &dev)?;
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json"))?)?;
    let captions: Vec<String> = expected["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    for (c, ids) in captions.iter().zip(expected["ids"].as_array().unwrap()) {
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc.tokenize(c)?, want);
    }
    let out = enc.encode(&captions)?;
    let want = Tensor::read_npy(fixture().join("expected_features.npy"))?;
    assert_eq!(out.features.dims(), want.dims());
    let diff = (&out.features - &want)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff <= 1e-4 * scale, "max diff {diff} (scale {scale})");
    // padded rows are exactly zero and the mask marks the valid rows at the end
    let mask = out.mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for (m, n) in mask.iter().zip(&out.lengths) {
        assert_eq!(m.iter().sum::<f32>() as usize, *n);
        assert!(m[MAX_CAPTION_TOKENS - n..].iter().all(|&x| x == 1.0));
    }
    Ok(())
}

#[test]
fn over_long_prompt_is_a_clear_error_unless_truncated() -> anyhow::Result<()> {
    let mut enc = TextEncoder::load(&fixture(), DType::F32, &Device::Cpu)?;
    let long = vec!["cat"; 200].join(" ");
    let err = enc.tokenize(&long).unwrap_err().to_string();
    assert!(
        err.contains("at most 120") && err.contains("--truncate-prompts"),
        "{err}"
    );
    enc.truncate = true;
    let ids = enc.tokenize(&long)?;
    assert_eq!(ids.len(), MAX_CAPTION_TOKENS);
    assert_eq!(*ids.last().unwrap(), 1, "EOS kept inside the 120 tokens");
    Ok(())
}

#[test]
fn missing_folder_is_a_clear_error() {
    let err = match TextEncoder::load(
        std::path::Path::new("/nonexistent/t5"),
        DType::F32,
        &Device::Cpu,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded a missing folder"),
    };
    assert!(err.contains("config.json") && !err.contains('\n'), "{err}");
}
