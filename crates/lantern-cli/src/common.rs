//! Options and helpers shared by several subcommands.
use anyhow::{bail, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use std::path::Path;

/// Where tensors live.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when built with it and a GPU is present, else CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first NVIDIA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Device selection shared by all commands.
#[derive(Args, Clone, Debug)]
pub struct DeviceOpts {
    /// Device to run on.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
}

impl DeviceOpts {
    /// The candle device for this choice.
    pub fn device(&self) -> Result<Device> {
        match self.device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device cuda: this lantern was built without CUDA; rebuild with `cargo build --release --features cuda`");
                }
                Ok(lantern::fused::cuda_device(0)?)
            }
            DeviceArg::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = lantern::fused::cuda_device(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Fails when `path` exists and `force` is not set, naming the flag that allows overwriting.
pub fn check_new_output(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists: choose another path or pass --force to overwrite it",
            path.display()
        );
    }
    Ok(())
}

/// A progress bar with lantern's style.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// The model bundle shipped in the repository (used when --models is not given).
pub const DEFAULT_MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/fashion");
