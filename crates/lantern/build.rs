//! With the `cuda` feature, compiles the CUDA kernels (`src/fused/kernels.cu`, and the decode
//! step's persistent block kernel `src/fused/decode_layer.cu`, the split-K projections
//! `src/fused/split_k.cu`) to PTX with nvcc (set up by
//! `../shared/tools/cuda-toolchain.sh`, see docs in README/gpu notes).
use std::path::PathBuf;
use std::process::Command;

/// Sources and the PTX file each becomes (in OUT_DIR).
const KERNELS: [(&str, &str); 3] = [
    ("src/fused/kernels.cu", "fused.ptx"),
    ("src/fused/decode_layer.cu", "decode_layer.ptx"),
    ("src/fused/split_k.cu", "split_k.ptx"),
];

fn main() {
    for (src, _) in KERNELS {
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-changed=src/fused/common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // the PTX's compute capability, for the kernels only some capabilities have (picks_cuda.rs)
    println!("cargo:rustc-env=LANTERN_PTX_CAP={cap}");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for (src, ptx) in KERNELS {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(src)
            .arg("-o")
            .arg(out_dir.join(ptx))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on {src} ({s})"),
            Err(e) => panic!(
                "the cuda feature needs nvcc ({nvcc}: {e}); run `eval \"$(../shared/tools/cuda-toolchain.sh)\"` first"
            ),
        }
    }
}
