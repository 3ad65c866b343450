//! Golden test of the VQ tokenizer against an independent PyTorch reference forward
//! (fixtures made by `tests/fixtures/make_vq_fixtures.py` on a tiny random model saved in the
//! official LlamaGen `.pt` layout).
use candle_core::{DType, Device, Tensor};
use lantern::image::{to_u8, value_to_u8};
use lantern::models::vq::{VqConfig, VqModel};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vq")
}

fn load() -> anyhow::Result<(VqModel, std::collections::HashMap<String, Tensor>)> {
    let dir = fixtures();
    let cfg = VqConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let model = VqModel::load_pt(&dir.join("tiny_vq.pt"), &cfg, &Device::Cpu)?;
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    Ok((model, expected))
}

#[test]
fn vq_golden_codes_match_reference() -> anyhow::Result<()> {
    let (model, exp) = load()?;
    let codes = model.encode(&exp["image"])?;
    let want = exp["codes"].to_dtype(DType::U32)?;
    assert_eq!(codes.to_vec2::<u32>()?, want.to_vec2::<u32>()?);
    // quantize() agrees with encode().
    let q = model.quantize(&model.encode_latent(&exp["image"])?)?;
    assert_eq!(q.codes.to_vec2::<u32>()?, want.to_vec2::<u32>()?);
    Ok(())
}

#[test]
fn vq_golden_decode_matches_reference() -> anyhow::Result<()> {
    let (model, exp) = load()?;
    let codes = exp["codes_in"].to_dtype(DType::U32)?;
    let got = model.decode_codes(&codes, (4, 4))?;
    let want = &exp["decoded"];
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * scale.max(1.0),
            "decoded[{i}] = {a}, reference {b}"
        );
    }
    // uint8: the conversion of the reference floats is exact ...
    let want_px = exp["pixels"]
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let ref_px: Vec<u8> = to_u8(want)?.concat();
    assert_eq!(ref_px, want_px);
    // ... and our decoded pixels equal it except where the reference sits on a rounding edge.
    let got_px = to_u8(&got)?.concat();
    let want_hwc = want
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (i, (a, b)) in got_px.iter().zip(&want_px).enumerate() {
        if a != b {
            let x = want_hwc[i];
            assert!(
                value_to_u8(x - 1e-4) != value_to_u8(x + 1e-4),
                "pixel {i}: {a} vs reference {b} (value {x})"
            );
        }
    }
    Ok(())
}

#[test]
fn vq_golden_rejects_bad_codes() -> anyhow::Result<()> {
    let (model, _) = load()?;
    let codes = Tensor::new(&[[64u32; 16]], &Device::Cpu)?;
    assert!(model.decode_codes(&codes, (4, 4)).is_err());
    Ok(())
}
