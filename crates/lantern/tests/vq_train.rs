//! A few CPU training steps of a tiny VQ model: the loss goes down, checkpoints load back, and
//! a resumed run continues from the saved step.
use candle_core::Device;
use lantern::data::ImageDataset;
use lantern::models::vq::{VqConfig, VqModel};
use lantern::train::vq::{evaluate_vq, train_vq, VqTrainConfig};
use lantern::train::TrainState;

fn tiny() -> VqConfig {
    VqConfig {
        codebook_size: 32,
        codebook_embed_dim: 4,
        codebook_l2_norm: true,
        z_channels: 8,
        ch: 8,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        in_channels: 1,
        attn_at_lowest: false,
        norm_groups: 4,
    }
}

/// 16 grey 6x6 images of bars and blocks (padded to 8x8 during training).
fn data() -> ImageDataset {
    let (h, w) = (6, 6);
    let mut images = Vec::new();
    for i in 0..16usize {
        for y in 0..h {
            for x in 0..w {
                let on = match i % 4 {
                    0 => x == i % w,
                    1 => y == i % h,
                    2 => x < 3 && y < 3,
                    _ => (x + y + i) % 3 == 0,
                };
                images.push(if on { 230 } else { 20 });
            }
        }
    }
    ImageDataset {
        images,
        labels: (0..16).map(|i| i % 4).collect(),
        height: h,
        width: w,
        channels: 1,
        class_names: (0..4).map(|i| i.to_string()).collect(),
    }
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("losses.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn vq_train_loss_decreases_and_checkpoint_round_trips() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("lantern-vq-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cfg, ds) = (tiny(), data());
    let tcfg = VqTrainConfig::new(40, &dir)
        .with_batch_size(8)
        .with_lr(3e-3)
        .with_warmup_steps(5)
        .with_log_every(1)
        .with_ckpt_every(20)
        .with_pad_to(8)
        .with_seed(7);
    let mut reports = 0;
    let report = train_vq(&cfg, &tcfg, &ds, &ds, &Device::Cpu, &mut |_| reports += 1)?;
    assert_eq!(reports, 40);
    let l = losses(&dir);
    assert_eq!(l.len(), 40);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < 0.7 * first,
        "loss did not go down: {first} -> {last}"
    );
    assert!(dir.join("recon_000020.png").is_file() && dir.join("recon_000040.png").is_file());

    // The saved folder loads for inference and evaluates to the same numbers.
    let model = VqModel::load_dir(&dir, &Device::Cpu)?;
    assert_eq!(model.config(), &cfg);
    let (psnr, usage) = evaluate_vq(&model, &ds, 8, 8)?;
    assert!(
        (psnr - report.test_psnr).abs() < 1e-6,
        "{psnr} vs {}",
        report.test_psnr
    );
    assert!((usage - report.code_usage).abs() < 1e-12);
    assert!(usage > 0.0 && usage <= 1.0);

    // A second run in the same folder needs --resume; with it, training continues at step 40.
    assert!(train_vq(&cfg, &tcfg, &ds, &ds, &Device::Cpu, &mut |_| {}).is_err());
    let more = tcfg.clone().with_resume(true);
    let more = VqTrainConfig { steps: 45, ..more };
    let mut steps = Vec::new();
    train_vq(&cfg, &more, &ds, &ds, &Device::Cpu, &mut |p| {
        steps.push(p.step)
    })?;
    assert_eq!(steps, vec![41, 42, 43, 44, 45]);
    assert_eq!(TrainState::read(&dir)?.map(|s| s.step), Some(45));
    assert_eq!(losses(&dir).len(), 45);
    // The resumed run starts from the trained weights, not from scratch.
    assert!(losses(&dir)[40] < first);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Times training steps of the proposed Fashion-MNIST config (32x32 → 16x16 tokens) and reports
/// test PSNR / code usage. Run: `cargo test -p lantern --test vq_train -- --ignored --nocapture`.
/// Environment: `LANTERN_VQ_STEPS` (default 5), `LANTERN_VQ_BATCH` (64), `LANTERN_VQ_LR` (5e-4),
/// `LANTERN_VQ_OUT` (output folder, default a temp dir), `LANTERN_FASHION_DIR` (data folder).
#[test]
#[ignore = "slow: needs the Fashion-MNIST data and minutes of CPU"]
fn vq_train_fashion_step_time() -> anyhow::Result<()> {
    use lantern::data::{fashion_mnist, Split, FASHION_MNIST_DIR};
    fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    }
    let dir: std::path::PathBuf = env("LANTERN_FASHION_DIR", FASHION_MNIST_DIR.into());
    let train = fashion_mnist(&dir, Split::Train)?;
    let test = fashion_mnist(&dir, Split::Test)?.take(1000);
    let steps: usize = env("LANTERN_VQ_STEPS", 5);
    let default_out =
        std::env::temp_dir().join(format!("lantern-vq-fashion-{}", std::process::id()));
    let out: std::path::PathBuf = env("LANTERN_VQ_OUT", default_out);
    let _ = std::fs::remove_dir_all(&out);
    let tcfg = VqTrainConfig::new(steps, &out)
        .with_batch_size(env("LANTERN_VQ_BATCH", 64))
        .with_lr(env("LANTERN_VQ_LR", 5e-4))
        .with_log_every((steps / 20).max(1))
        .with_ckpt_every((steps / 4).max(1))
        .with_warmup_steps(steps.min(200) / 4 + 1);
    let cfg = VqConfig::fashion_small();
    let t = std::time::Instant::now();
    let r = train_vq(&cfg, &tcfg, &train, &test, &Device::Cpu, &mut |p| {
        println!(
            "step {} loss {:.4} lr {:.2e} {:.1}s",
            p.step, p.loss, p.lr, p.elapsed_s
        )
    })?;
    println!(
        "{steps} steps: {:.3} s/step, test PSNR {:.2} dB, code usage {:.3}, total {:.1}s, out {}",
        r.seconds_per_step,
        r.test_psnr,
        r.code_usage,
        t.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
