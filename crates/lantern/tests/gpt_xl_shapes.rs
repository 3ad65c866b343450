//! GPT-XL (c2i, real shapes, zero weights) on CPU: proves the shapes work and prints the time
//! per token. Ignored by default (3 GB of weights); run with
//! `cargo test -p lantern --release --test gpt_xl_shapes -- --ignored --nocapture`
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lantern::models::llamagen::{AttnMask, Condition, Config, LlamaGen};

#[test]
#[ignore = "allocates GPT-XL (3 GB); run explicitly"]
fn gpt_xl_forward_shapes_and_cpu_speed() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = Config::gpt_xl();
    let m = LlamaGen::load(VarBuilder::zeros(DType::F32, &dev), &cfg)?;
    let mut cache = m.new_cache(2, m.cache_len(0))?;
    let cond = m.embed_condition(&Condition::Classes(vec![207, 1000]))?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4], [1, 2, 3, 4]], &dev)?;
    let x = Tensor::cat(&[cond, m.embed_tokens(&ids)?], 1)?;
    let t = std::time::Instant::now();
    let h = m.forward(
        &x,
        &Tensor::arange(0u32, 5, &dev)?,
        &AttnMask::Causal,
        &mut cache,
    )?;
    let logits = m.lm_head(&h)?;
    assert_eq!(logits.dims(), &[2, 5, 16384]);
    println!(
        "GPT-XL prefill of 5 positions (batch 2): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let steps = 4;
    let t = std::time::Instant::now();
    for p in 5..5 + steps {
        let x = m.embed_tokens(&Tensor::new(&[[7u32], [7]], &dev)?)?;
        let h = m.forward(
            &x,
            &Tensor::new(&[p as u32], &dev)?,
            &AttnMask::Causal,
            &mut cache,
        )?;
        assert_eq!(m.lm_head(&h)?.dims(), &[2, 1, 16384]);
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    println!("GPT-XL c2i CPU decode: {ms:.0} ms/token (batch 2 = one CFG step)");
    assert_eq!(cache.len(), 5 + steps);
    Ok(())
}
