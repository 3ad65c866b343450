//! Checkpoint loading: formats, dtypes, inspect, and clean errors for damaged, mismatched and
//! malicious files. Run: `cargo test -p lantern --test gpt_load`
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{fixtures, load_c2i, rel_err, tiny_c2i};
use lantern::load::{inspect, load_llamagen, open_weights, CheckpointKind};
use lantern::models::llamagen::{AttnMask, Condition, Config, LlamaGen, ModelType};
use lantern::Error;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lantern_gpt_load_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits(m: &LlamaGen) -> Result<Tensor> {
    let cond = m.embed_condition(&Condition::Classes(vec![3, 10]))?;
    let ids = Tensor::new(&[[5u32, 17, 3], [0, 63, 12]], &Device::Cpu)?;
    let x = Tensor::cat(&[cond, m.embed_tokens(&ids)?], 1)?;
    let mut cache = m.new_cache(2, 8)?;
    let pos = Tensor::arange(0u32, 4, &Device::Cpu)?;
    Ok(m.lm_head(&m.forward(&x, &pos, &AttnMask::Causal, &mut cache)?)?)
}

fn load_err(path: &Path, cfg: Option<&Config>) -> Error {
    match load_llamagen(path, cfg, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

fn one_line(e: &Error) -> String {
    let s = e.to_string();
    println!("{s}");
    assert!(!s.contains('\n'), "multi-line error: {s}");
    s
}

#[test]
fn half_precision_loads_and_runs() -> Result<()> {
    let reference = logits(&load_c2i(DType::F32)?)?;
    for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 6e-2)] {
        let m = load_c2i(dt)?;
        assert_eq!(m.dtype(), dt);
        let l = logits(&m)?;
        assert_eq!(l.dtype(), DType::F32);
        let e = rel_err(&l, &reference)?;
        assert!(e < tol && e > 0.0, "{dt:?}: {e}");
    }
    Ok(())
}

#[test]
fn malicious_pickle_is_not_executed() -> Result<()> {
    let marker = Path::new("/tmp/lantern_pickle_pwned");
    let _ = std::fs::remove_file(marker);
    let dev = Device::Cpu;
    // A state dict next to an `os.system` call: the call is ignored, the weights load.
    let (m, rep) = load_llamagen(
        &fixtures().join("c2i_evil.pt"),
        Some(&tiny_c2i()),
        DType::F32,
        &dev,
    )?;
    assert_eq!(rep.state_key.as_deref(), Some("model"));
    let good = load_c2i(DType::F32)?;
    assert_eq!(rel_err(&logits(&m)?, &logits(&good)?)?, 0.0);
    // A pickle that is only an `os.system` call: a clean error.
    let e = load_err(&fixtures().join("evil_top.pt"), Some(&tiny_c2i()));
    assert!(
        matches!(e, Error::Load { .. }) && one_line(&e).contains("no tensors"),
        "{e}"
    );
    assert!(!marker.exists(), "the pickle's os.system call ran");
    Ok(())
}

#[test]
fn truncated_and_missing_files_fail_cleanly() -> Result<()> {
    let d = tmp("trunc");
    let e = load_err(&d.join("nope.pt"), None);
    assert!(one_line(&e).contains("no such file"), "{e}");
    for (src, name) in [
        ("c2i.pt", "half.pt"),
        ("t2i_hf/model.safetensors", "half.safetensors"),
    ] {
        let bytes = std::fs::read(fixtures().join(src))?;
        for cut in [bytes.len() / 2, 10, 0] {
            let p = d.join(name);
            std::fs::write(&p, &bytes[..cut])?;
            let e = load_err(&p, Some(&tiny_c2i()));
            assert!(matches!(e, Error::Load { .. }), "{src} cut at {cut}: {e}");
            one_line(&e);
        }
    }
    std::fs::write(d.join("garbage.pt"), b"not a checkpoint at all")?;
    let e = load_err(&d.join("garbage.pt"), None);
    assert!(one_line(&e).contains("zip"), "{e}");
    Ok(())
}

#[test]
fn wrong_shape_names_the_tensor() {
    let cfg = Config {
        ffn_hidden: 128,
        ..tiny_c2i()
    };
    match load_err(&fixtures().join("c2i.pt"), Some(&cfg)) {
        Error::Shape {
            name,
            expected,
            actual,
            ..
        } => {
            assert_eq!(name, "layers.0.feed_forward.w1.weight");
            assert_eq!((expected, actual), (vec![128, 32], vec![64, 32]));
        }
        e => panic!("{e}"),
    }
    let cfg = Config {
        model_type: ModelType::T2i,
        caption_dim: 32,
        cls_token_num: 120,
        ..tiny_c2i()
    };
    let e = load_err(&fixtures().join("c2i.pt"), Some(&cfg));
    assert!(one_line(&e).contains("cap_proj"), "{e}");
}

fn hf_tensors() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixtures().join("t2i_hf/model.safetensors"),
        &Device::Cpu,
    )?)
}

#[test]
fn missing_key_and_wrong_kind_fail_cleanly() -> Result<()> {
    let d = tmp("keys");
    let mut ts = hf_tensors()?;
    ts.remove("model.layers.1.self_attn.k_proj.weight");
    candle_core::safetensors::save(&ts, d.join("model.safetensors"))?;
    std::fs::copy(fixtures().join("t2i_hf/config.json"), d.join("config.json"))?;
    let e = load_err(&d, None);
    assert!(
        one_line(&e).contains("layers.1.attention.wqkv.weight"),
        "{e}"
    );
    // A VQ tokenizer given as a GPT.
    let vq: HashMap<String, Tensor> = [
        "quantize.embedding.weight",
        "encoder.conv_in.weight",
        "decoder.conv_out.weight",
    ]
    .iter()
    .map(|n| {
        (
            n.to_string(),
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
        )
    })
    .collect();
    candle_core::safetensors::save(&vq, d.join("vq.safetensors"))?;
    let e = load_err(&d.join("vq.safetensors"), None);
    assert!(one_line(&e).contains("VQ tokenizer"), "{e}");
    // The drafter given as a GPT.
    let e = load_err(&fixtures().join("drafter"), None);
    assert!(one_line(&e).contains("drafter"), "{e}");
    Ok(())
}

#[test]
fn inspect_reports_kind_and_config() -> Result<()> {
    let i = inspect(&fixtures().join("c2i.pt"))?;
    assert_eq!(
        i.kind,
        CheckpointKind::LlamaGen {
            model_type: ModelType::C2i,
            hf: false
        }
    );
    assert_eq!(i.state_key.as_deref(), Some("model"));
    assert_eq!(i.dtype, Some(DType::F32));
    let c = i.config.clone().unwrap();
    assert_eq!(
        (c.dim, c.n_layer, c.vocab_size, c.ffn_hidden, c.num_classes),
        (32, 2, 64, 64, 10)
    );
    assert_eq!(i.n_params, tiny_c2i().param_count());
    // block_size from the stored training args (image_size 64 / 16 = 4x4 grid).
    assert_eq!(i.args.get("image_size"), Some(&serde_json::json!(64)));
    assert_eq!(c.block_size, 16);
    let text = i.to_string();
    assert!(
        text.contains("kind: LlamaGen c2i GPT (original names)"),
        "{text}"
    );
    let h = inspect(&fixtures().join("t2i_hf"))?;
    assert_eq!(
        h.kind,
        CheckpointKind::LlamaGen {
            model_type: ModelType::T2i,
            hf: true
        }
    );
    assert_eq!(h.config.as_ref().map(|c| c.block_size), Some(16));
    let dr = inspect(&fixtures().join("drafter"))?;
    assert_eq!(dr.kind, CheckpointKind::Drafter);
    assert_eq!(dr.drafter.unwrap().cls_token_num, 119);
    // Both formats expose the same canonical tensors.
    let (_, a) = open_weights(&fixtures().join("t2i.pt"), DType::F32, &Device::Cpu)?;
    let (_, b) = open_weights(&fixtures().join("t2i_hf"), DType::F32, &Device::Cpu)?;
    for (n, s) in LlamaGen::expected_tensors(&h.config.clone().unwrap_or_else(tiny_c2i)) {
        assert_eq!(a.canonical_shape(&n), Some(s.clone()), "{n}");
        assert_eq!(b.canonical_shape(&n), Some(s), "{n}");
    }
    Ok(())
}
