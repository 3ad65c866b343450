//! End-to-end tests of the `lantern` binary on the shipped model bundle: generation with the
//! default (LANTERN++) and AR decoding, token round trip through `decode`, and one-line errors
//! (including `bench` row specs).
use std::path::PathBuf;
use std::process::Command;

fn lantern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lantern"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lantern-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = lantern().args(args).output().expect("run lantern");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_decode_round_trip_and_refuse_overwrite() {
    let out = tmp("gen");
    let o = out.to_str().unwrap();
    let tokens = out.join("tokens.json");
    let stats = out.join("stats.json");
    let (ok, stdout, stderr) = run(&[
        "generate",
        "--class",
        "sneaker,trouser",
        "-n",
        "1",
        "--out",
        o,
        "--device",
        "cpu",
        "--save-tokens",
        tokens.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("tau"), "{stdout}");
    for f in ["0000.png", "0001.png", "grid.png"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokens).unwrap()).unwrap();
    assert_eq!(t["grid"], serde_json::json!([16, 16]));
    assert_eq!(t["images"].as_array().unwrap().len(), 2);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(s[0]["tau"].as_f64().unwrap() >= 1.0);

    // the same tokens decode to the same pixels
    let dec = tmp("dec");
    let vq = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/fashion/vq");
    let (ok, _, stderr) = run(&[
        "decode",
        "--vq",
        vq,
        "--tokens",
        tokens.to_str().unwrap(),
        "--out",
        dec.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read(out.join("0000.png")).unwrap(),
        std::fs::read(dec.join("0000.png")).unwrap()
    );

    // a second run into the same folder refuses to overwrite, in one line, naming --force
    let (ok, _, stderr) = run(&[
        "generate",
        "--class",
        "sneaker",
        "-n",
        "1",
        "--out",
        o,
        "--device",
        "cpu",
        "--decoding",
        "ar",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--force") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&dec).ok();
}

#[test]
fn by_class_folders_feed_eval() {
    let out = tmp("byclass");
    let o = out.to_str().unwrap();
    let (ok, _, stderr) = run(&[
        "generate",
        "--class",
        "sneaker,trouser",
        "-n",
        "1",
        "--by-class",
        "--out",
        o,
        "--device",
        "cpu",
        "--decoding",
        "ar",
    ]);
    assert!(ok, "{stderr}");
    for f in ["sneaker/0000.png", "trouser/0001.png", "grid.png"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(!out.join("0000.png").exists());
    let clf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/fashion/classifier"
    );
    let (ok, stdout, stderr) = run(&["eval", "--classifier", clf, o, "--device", "cpu"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("accuracy"), "{stdout}");
    // the same outputs again are refused before any work, naming --force
    let (ok, _, stderr) = run(&[
        "generate",
        "--class",
        "trouser",
        "-n",
        "1",
        "--by-class",
        "--out",
        o,
        "--device",
        "cpu",
    ]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bad_input_gives_one_line_errors() {
    let out = tmp("bad");
    let o = out.to_str().unwrap();
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "generate", "--class", "unicorn", "--out", o, "--device", "cpu",
            ],
            "choose one of",
        ),
        (
            &["generate", "--class", "12", "--out", o, "--device", "cpu"],
            "out of range",
        ),
        (
            &[
                "generate", "--class", "bag", "--top-p", "0", "--out", o, "--device", "cpu",
            ],
            "top-p",
        ),
        (
            &[
                "generate",
                "--class",
                "bag",
                "--decoding",
                "lantern",
                "--delta=-0.1",
                "--out",
                o,
                "--device",
                "cpu",
            ],
            "delta",
        ),
        (
            &[
                "generate",
                "--class",
                "bag",
                "--models",
                "/nonexistent",
                "--out",
                o,
                "--device",
                "cpu",
            ],
            "--gpt",
        ),
        (&["inspect", "/nonexistent/model.pt"], "nonexistent"),
        // bench rows: a k above the shipped table's 200, a malformed @k, an unknown suffix
        (
            &["bench", "--modes", "ar,lantern-0.2@k500", "--device", "cpu"],
            "use @k200 or less",
        ),
        (
            &["bench", "--modes", "lantern++-2@50", "--device", "cpu"],
            "@kK",
        ),
        (
            &["bench", "--modes", "sd-static/fast", "--device", "cpu"],
            "/greedy",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} should fail");
        let line = stderr.trim();
        assert!(
            line.starts_with("error:") && line.lines().count() == 1,
            "{args:?}: {stderr}"
        );
        assert!(line.contains(want), "{args:?}: `{line}` lacks `{want}`");
        assert!(!line.contains("panicked"), "{line}");
    }
}

#[test]
fn text_to_image_with_prompts_on_tiny_checkpoints() {
    let f = concat!(env!("CARGO_MANIFEST_DIR"), "/../lantern/tests/fixtures");
    let out = tmp("t2i");
    let gpt = format!("{f}/gpt/t2i_hf");
    let vq = format!("{f}/vq/tiny_vq.pt");
    let t5 = format!("{f}/t5");
    let drafter = format!("{f}/gpt/drafter");
    let base = [
        "generate",
        "--models",
        "/nonexistent",
        "--gpt",
        &gpt,
        "--vq",
        &vq,
        "--t5",
        &t5,
        "--device",
        "cpu",
    ];
    let toks = out.join("t.json");
    let mut args: Vec<&str> = base.to_vec();
    args.extend([
        "--prompt",
        "a photo of a red car",
        "-n",
        "2",
        "--decoding",
        "sd",
        "--drafter",
        &drafter,
        "--temperature",
        "0",
    ]);
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--save-tokens",
        toks.to_str().unwrap(),
    ]);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 images for 1 prompts"), "{stdout}");
    // greedy speculative output equals greedy AR output through the CLI too
    let out2 = tmp("t2i-ar");
    let toks2 = out2.join("t.json");
    let mut args: Vec<&str> = base.to_vec();
    args.extend([
        "--prompt",
        "a photo of a red car",
        "-n",
        "2",
        "--decoding",
        "ar",
        "--temperature",
        "0",
    ]);
    args.extend([
        "--out",
        out2.to_str().unwrap(),
        "--save-tokens",
        toks2.to_str().unwrap(),
    ]);
    let (ok, _, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&toks).unwrap(),
        std::fs::read_to_string(&toks2).unwrap()
    );
    // a class on a text model, and a prompt without T5, are clear errors
    let (ok, _, stderr) = run(&[
        "generate",
        "--models",
        "/nonexistent",
        "--gpt",
        &gpt,
        "--vq",
        &vq,
        "--class",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!ok && stderr.contains("--prompt"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "generate",
        "--models",
        "/nonexistent",
        "--gpt",
        &gpt,
        "--vq",
        &vq,
        "--prompt",
        "x",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!ok && stderr.contains("--t5"), "{stderr}");
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&out2).ok();
}

#[test]
fn train_gpt_refuses_an_existing_run_and_resumes_old_and_new_state_files() {
    let out = tmp("train-gpt");
    std::fs::create_dir_all(&out).unwrap();
    let tokens = out.join("tokens.safetensors");
    lantern::data::TokenDataset {
        tokens: (0..24).map(|i| (i * 5 % 8) as u32).collect(),
        labels: vec![0, 1, 0, 1, 0, 1],
        grid: (2, 2),
        vocab: 8,
    }
    .save(&tokens)
    .unwrap();
    let run_dir = out.join("run");
    let train = |extra: &[&str]| {
        let t = tokens.to_str().unwrap();
        let mut args = vec!["train", "gpt", "--tokens", t, "--test-tokens", t];
        args.extend(["--out", run_dir.to_str().unwrap(), "--device", "cpu"]);
        args.extend([
            "--dim",
            "16",
            "--layers",
            "1",
            "--heads",
            "2",
            "--batch-size",
            "2",
        ]);
        args.extend(["--warmup", "1", "--ckpt-every", "1"]);
        args.extend(extra);
        run(&args)
    };
    let state = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run_dir.join(f)).unwrap()).unwrap()
    };
    let (ok, _, stderr) = train(&["--steps", "2"]);
    assert!(ok, "{stderr}");
    assert_eq!(state("train_state.json")["step"], 2);
    assert!(!run_dir.join("state.json").exists());
    assert!(run_dir.join("export/model.safetensors").exists());
    let (ok, _, stderr) = train(&["--steps", "2"]);
    assert!(!ok && stderr.contains("train_state.json"), "{stderr}");

    // a folder of the old GPT trainer (state.json with the step only) is refused and resumed
    std::fs::remove_file(run_dir.join("train_state.json")).unwrap();
    std::fs::write(run_dir.join("state.json"), r#"{"step":2}"#).unwrap();
    let (ok, _, stderr) = train(&["--steps", "3"]);
    assert!(!ok && stderr.contains("state.json"), "{stderr}");
    let (ok, _, stderr) = train(&["--steps", "3", "--resume"]);
    assert!(ok, "{stderr}");
    assert_eq!(state("train_state.json")["step"], 3);
    let csv = std::fs::read_to_string(run_dir.join("losses.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3, "{csv}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `bench --random-weights` at the tiny preset on the CPU: the step table, the loop rows and
/// the targets table with a verdict for each measured target.
#[test]
fn random_weight_bench_ends_with_the_targets_table() {
    let (ok, stdout, stderr) = run(&[
        "bench",
        "--random-weights",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--loop-images",
        "1",
        "--loop-tokens",
        "8",
    ]);
    assert!(ok, "{stderr}");
    let at = stdout.find("targets (").expect("a targets table");
    let table = &stdout[at..];
    for t in [
        "share of its bandwidth bound",
        "over the decode step",
        "loop overhead",
    ] {
        let line = table
            .lines()
            .find(|l| l.contains(t))
            .unwrap_or_else(|| panic!("no `{t}` row:\n{table}"));
        assert!(
            line.ends_with("| yes |") || line.ends_with("| no |"),
            "{line}"
        );
    }
}
