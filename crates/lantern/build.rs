//! With the `cuda` feature, compiles the fused kernels (`src/fused/kernels.cu`) to PTX with
//! nvcc (set up by `../shared/tools/cuda-toolchain.sh`, see docs in README/gpu notes).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/fused/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/fused/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on src/fused/kernels.cu ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc ({nvcc}: {e}); run `eval \"$(../shared/tools/cuda-toolchain.sh)\"` first"
        ),
    }
}
