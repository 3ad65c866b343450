//! Golden tests of the LlamaGen GPT and the drafter against the plain-torch reference in
//! `tests/fixtures/make_gpt_fixtures.py` (tiny random models; fixtures committed).
//! Run: `cargo test -p lantern --test gpt_golden`
mod common;

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{expected, fixture_drafter, fixtures, load_c2i, rel_err, t2i, t2i_pt, tiny_t2i};
use lantern::load::load_llamagen;
use lantern::models::llamagen::{caption_mask, AttnMask, Condition, Config, LlamaGen};

fn u32s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?)
}

fn arange(a: usize, b: usize) -> Result<Tensor> {
    Ok(Tensor::arange(a as u32, b as u32, &Device::Cpu)?)
}

fn c2i_inputs(m: &LlamaGen, exp: &HashMap<String, Tensor>) -> Result<Tensor> {
    let classes: Vec<u32> = exp["c2i_classes"].to_dtype(DType::U32)?.to_vec1()?;
    let cond = m.embed_condition(&Condition::Classes(classes))?;
    Ok(Tensor::cat(
        &[cond, m.embed_tokens(&u32s(&exp["c2i_tokens"])?)?],
        1,
    )?)
}

#[test]
fn c2i_full_and_cached_match_reference() -> Result<()> {
    let exp = expected()?;
    let m = load_c2i(DType::F32)?;
    let x = c2i_inputs(&m, &exp)?;
    let s = x.dim(1)?;
    let want = &exp["c2i_logits"];
    // Full sequence in one pass.
    let mut cache = m.new_cache(2, 32)?;
    let h = m.forward(&x, &arange(0, s)?, &AttnMask::Causal, &mut cache)?;
    let logits = m.lm_head(&h)?;
    assert_eq!(logits.dtype(), DType::F32);
    assert!(
        rel_err(&logits, want)? < 1e-4,
        "full: {}",
        rel_err(&logits, want)?
    );
    // Prefill 6 positions, then single-token steps.
    let mut cache = m.new_cache(2, 32)?;
    let mut rows = vec![m.lm_head(&m.forward(
        &x.narrow(1, 0, 6)?,
        &arange(0, 6)?,
        &AttnMask::Causal,
        &mut cache,
    )?)?];
    for p in 6..s {
        let h = m.forward(
            &x.narrow(1, p, 1)?,
            &arange(p, p + 1)?,
            &AttnMask::Causal,
            &mut cache,
        )?;
        rows.push(m.lm_head(&h)?);
    }
    assert_eq!(cache.len(), s);
    let cached = Tensor::cat(&rows, 1)?;
    let e = rel_err(&cached, want)?;
    assert!(e < 1e-4, "cached: {e}");
    // Prefill with a non-empty cache (causal block of 3 after 6).
    cache.truncate(6);
    let h = m.forward(
        &x.narrow(1, 6, 3)?,
        &arange(6, 9)?,
        &AttnMask::Causal,
        &mut cache,
    )?;
    assert!(rel_err(&m.lm_head(&h)?, &want.narrow(1, 6, 3)?)? < 1e-4);
    Ok(())
}

#[test]
fn c2i_batch_equals_single() -> Result<()> {
    let exp = expected()?;
    let m = load_c2i(DType::F32)?;
    let x = c2i_inputs(&m, &exp)?;
    let s = x.dim(1)?;
    let mut c2 = m.new_cache(2, s)?;
    let both = m.lm_head(&m.forward(&x, &arange(0, s)?, &AttnMask::Causal, &mut c2)?)?;
    let mut c1 = m.new_cache(1, s)?;
    let one = m.lm_head(&m.forward(&x.i(1..2)?, &arange(0, s)?, &AttnMask::Causal, &mut c1)?)?;
    assert!(rel_err(&one, &both.i(1..2)?)? < 1e-5);
    // [b, s] positions give the same result as [s].
    let pos = arange(0, s)?.unsqueeze(0)?.repeat((2, 1))?;
    let mut c2 = m.new_cache(2, s)?;
    let again = m.lm_head(&m.forward(&x, &pos, &AttnMask::Causal, &mut c2)?)?;
    assert!(rel_err(&again, &both)? < 1e-6);
    Ok(())
}

fn cfg_argmax(logits: &Tensor, scale: f64) -> Result<u32> {
    let cond = logits.i((0, 0))?;
    let unc = logits.i((1, 0))?;
    let mixed = (&unc + ((cond - &unc)? * scale)?)?;
    Ok(mixed.argmax(0)?.to_scalar::<u32>()?)
}

/// Greedy CFG decoding with the cache: prefill the condition, then one token per step.
fn greedy(
    m: &LlamaGen,
    cond: &Tensor,
    mask: impl Fn(usize, usize) -> Result<AttnMask>,
) -> Result<Vec<u32>> {
    let cfg = m.config().clone();
    let n = cfg.cls_token_num;
    let mut cache = m.new_cache(2, m.cache_len(0))?;
    let h = m.forward(cond, &arange(0, n)?, &mask(n, 0)?, &mut cache)?;
    let mut last = m.lm_head(&h.narrow(1, n - 1, 1)?)?;
    let mut out = vec![];
    let t0 = std::time::Instant::now();
    for i in 0..cfg.block_size {
        let t = cfg_argmax(&last, 4.0)?;
        out.push(t);
        if i + 1 == cfg.block_size {
            break;
        }
        let ids = Tensor::new(&[[t], [t]], &Device::Cpu)?;
        let x = m.embed_tokens(&ids)?;
        let p = n + i;
        last = m.lm_head(&m.forward(&x, &arange(p, p + 1)?, &mask(1, p)?, &mut cache)?)?;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / (cfg.block_size - 1) as f64;
    println!(
        "tiny {:?} CPU: {ms:.2} ms/token (batch 2, CFG)",
        cfg.model_type
    );
    Ok(out)
}

#[test]
fn c2i_greedy_cfg_matches_reference() -> Result<()> {
    let exp = expected()?;
    let m = load_c2i(DType::F32)?;
    let cond = m.embed_condition(&Condition::Classes(vec![7, 10]))?;
    let toks = greedy(&m, &cond, |_, _| Ok(AttnMask::Causal))?;
    let want: Vec<u32> = exp["c2i_greedy_cfg4"].to_dtype(DType::U32)?.to_vec1()?;
    assert_eq!(toks, want);
    Ok(())
}

fn t2i_models() -> Result<Vec<LlamaGen>> {
    let dev = Device::Cpu;
    let a = t2i_pt()?;
    let (b, rep) = load_llamagen(&fixtures().join("t2i_hf"), None, DType::F32, &dev)?;
    assert_eq!(rep.format, lantern::load::CheckpointFormat::Safetensors);
    assert_eq!(b.config().n_kv_head, 1);
    assert_eq!(b.config().extra_rope_rows, 10);
    Ok(vec![a, b])
}

#[test]
fn t2i_both_formats_match_reference_with_padding() -> Result<()> {
    let exp = expected()?;
    let feats = &exp["t2i_features"];
    let valid = &exp["t2i_valid"];
    for m in t2i_models()? {
        // The fixture's unconditional half is the checkpoint's null caption.
        assert!(rel_err(&m.uncond_caption(1)?, &feats.i(1..2)?)? < 1e-7);
        let cond = m.embed_condition(&Condition::Captions {
            features: feats.clone(),
            mask: valid.clone(),
        })?;
        let x = Tensor::cat(&[cond, m.embed_tokens(&u32s(&exp["t2i_tokens"])?)?], 1)?;
        let s = x.dim(1)?;
        let mut cache = m.new_cache(2, 136)?;
        let mask = |q: usize, past: usize| -> Result<AttnMask> {
            Ok(AttnMask::Custom(caption_mask(
                valid,
                q,
                past,
                &Device::Cpu,
            )?))
        };
        let mut hs = vec![m.forward(
            &x.narrow(1, 0, 120)?,
            &arange(0, 120)?,
            &mask(120, 0)?,
            &mut cache,
        )?];
        for p in 120..s {
            hs.push(m.forward(
                &x.narrow(1, p, 1)?,
                &arange(p, p + 1)?,
                &mask(1, p)?,
                &mut cache,
            )?);
        }
        let h = Tensor::cat(&hs, 1)?;
        let e = rel_err(&h, &exp["t2i_hidden"])?;
        assert!(e < 1e-4, "hidden {e}");
        let e = rel_err(&m.lm_head(&h)?, &exp["t2i_logits"])?;
        assert!(e < 1e-4, "logits {e}");
        // Padded caption rows of the conditional half stay exactly zero.
        let pad = h
            .i((0, 0..113))?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(pad, 0.0);
        // A block of image tokens at once over the cached caption.
        cache.truncate(120);
        let hb = m.forward(
            &x.narrow(1, 120, 6)?,
            &arange(120, 126)?,
            &mask(6, 120)?,
            &mut cache,
        )?;
        assert!(rel_err(&hb, &exp["t2i_hidden"].narrow(1, 120, 6)?)? < 1e-4);
    }
    Ok(())
}

#[test]
fn t2i_greedy_cfg_matches_reference() -> Result<()> {
    let exp = expected()?;
    let valid = exp["t2i_valid"].clone();
    let m = t2i()?;
    let cond = m.embed_condition(&Condition::Captions {
        features: exp["t2i_features"].clone(),
        mask: valid.clone(),
    })?;
    let toks = greedy(&m, &cond, |q, past| {
        Ok(AttnMask::Custom(caption_mask(
            &valid,
            q,
            past,
            &Device::Cpu,
        )?))
    })?;
    let want: Vec<u32> = exp["t2i_greedy_cfg4"].to_dtype(DType::U32)?.to_vec1()?;
    assert_eq!(toks, want);
    Ok(())
}

#[test]
fn drafter_matches_reference() -> Result<()> {
    let exp = expected()?;
    let target = t2i_pt()?;
    let d = fixture_drafter(false)?;
    d.check_target(target.config())?;
    let bad = Config {
        dim: 64,
        ..tiny_t2i()
    };
    let err = d.check_target(&bad).unwrap_err().to_string();
    assert!(err.contains("width"), "{err}");
    let ids = u32s(&exp["drafter_ids"])?;
    let n = ids.dim(1)?;
    let feats = exp["t2i_hidden"].narrow(1, 0, n)?;
    let mut cache = d.new_cache(2, 160)?;
    let mut outs = vec![d.forward(
        &ids.narrow(1, 0, 120)?,
        &feats.narrow(1, 0, 120)?,
        &arange(0, 120)?,
        &AttnMask::Causal,
        &mut cache,
    )?];
    for p in 120..n {
        outs.push(d.forward(
            &ids.narrow(1, p, 1)?,
            &feats.narrow(1, p, 1)?,
            &arange(p, p + 1)?,
            &AttnMask::Causal,
            &mut cache,
        )?);
    }
    let out = Tensor::cat(&outs, 1)?;
    let e = rel_err(&out, &exp["drafter_out"])?;
    assert!(e < 1e-4, "drafter features {e}");
    let e = rel_err(&target.lm_head(&out)?, &exp["drafter_logits"])?;
    assert!(e < 1e-4, "drafter logits {e}");
    Ok(())
}

#[test]
fn tree_block_with_custom_mask_and_keep_matches_sequential() -> Result<()> {
    let exp = expected()?;
    let m = load_c2i(DType::F32)?;
    let x = c2i_inputs(&m, &exp)?.i(0..1)?;
    let embed = |t: u32| m.embed_tokens(&Tensor::new(&[[t]], &Device::Cpu).unwrap());
    // Sequential reference: prefix (6 positions), then b, c, d.
    let mut seq = m.new_cache(1, 16)?;
    m.forward(
        &x.narrow(1, 0, 6)?,
        &arange(0, 6)?,
        &AttnMask::Causal,
        &mut seq,
    )?;
    let hb = m.forward(&embed(9)?, &arange(6, 7)?, &AttnMask::Causal, &mut seq)?;
    let hc = m.forward(&embed(40)?, &arange(7, 8)?, &AttnMask::Causal, &mut seq)?;
    let hd = m.forward(&embed(2)?, &arange(8, 9)?, &AttnMask::Causal, &mut seq)?;
    // Tree: a and b siblings at position 6, c child of b at position 7.
    let mut tree = m.new_cache(1, 16)?;
    m.forward(
        &x.narrow(1, 0, 6)?,
        &arange(0, 6)?,
        &AttnMask::Causal,
        &mut tree,
    )?;
    let block = Tensor::cat(&[embed(30)?, embed(9)?, embed(40)?], 1)?;
    let ninf = f32::NEG_INFINITY;
    let mut rows = vec![];
    for allowed in [
        [true, false, false],
        [false, true, false],
        [false, true, true],
    ] {
        rows.extend([0f32; 6]);
        rows.extend(allowed.iter().map(|&a| if a { 0.0 } else { ninf }));
    }
    let mask = AttnMask::Custom(Tensor::from_vec(rows, (3, 9), &Device::Cpu)?);
    let pos = Tensor::new(&[6u32, 6, 7], &Device::Cpu)?;
    let h = m.forward(&block, &pos, &mask, &mut tree)?;
    assert!(rel_err(&h.i((.., 1..2))?, &hb)? < 1e-5);
    assert!(rel_err(&h.i((.., 2..3))?, &hc)? < 1e-5);
    // Keep the accepted path b, c; the next token then sees exactly the sequential cache.
    tree.keep(6, &[1, 2])?;
    assert_eq!(tree.len(), 8);
    let h2 = m.forward(&embed(2)?, &arange(8, 9)?, &AttnMask::Causal, &mut tree)?;
    assert!(rel_err(&h2, &hd)? < 1e-5);
    // Without compaction the result differs (the test can fail).
    let mut raw = m.new_cache(1, 16)?;
    m.forward(
        &x.narrow(1, 0, 6)?,
        &arange(0, 6)?,
        &AttnMask::Causal,
        &mut raw,
    )?;
    m.forward(&block, &pos, &mask, &mut raw)?;
    raw.truncate(8);
    let bad = m.forward(&embed(2)?, &arange(8, 9)?, &AttnMask::Causal, &mut raw)?;
    assert!(rel_err(&bad, &hd)? > 1e-3);
    Ok(())
}

#[test]
fn varmap_init_is_trainable() -> Result<()> {
    // The same `load` builds fresh trainable weights: norms start at 1, projections non-zero.
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let d = lantern::models::drafter::DrafterConfig::from_hf_value(&serde_json::json!({
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "vocab_size": 64, "input_type": "t2i", "block_size": 16
    }))
    .map_err(anyhow::Error::msg)?;
    lantern::models::drafter::Drafter::load(vb.clone(), &d)?;
    let m = LlamaGen::load(vb.pp("target"), &tiny_t2i())?;
    let data = vm.data().lock().unwrap();
    let norm = data["target.norm.weight"].as_tensor().to_vec1::<f32>()?;
    assert!(norm.iter().all(|&v| v == 1.0));
    for n in [
        "layers.0.self_attn.q_proj.weight",
        "fc.bias",
        "target.cls_embedding.uncond_embedding",
    ] {
        let t = data[n].as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(t > 0.0, "{n} is zero");
    }
    drop(data);
    let (_, logits) = m.forward_train(
        &m.embed_condition(&Condition::Captions {
            features: m.uncond_caption(1)?,
            mask: Tensor::ones((1, 120), DType::F32, &dev)?,
        })?,
        &Tensor::new(&[[1u32, 2, 3]], &dev)?,
        None,
    )?;
    assert_eq!(logits.dims(), &[1, 123, 64]);
    Ok(())
}
