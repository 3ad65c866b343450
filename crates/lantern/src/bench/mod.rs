//! Benchmarks of the engine's building blocks: per-step timing against the device's measured
//! copy-bandwidth and matmul ceilings ([`steps`]), the steps' analytic bytes and FLOPs
//! ([`cost`]), and random weights at real shapes ([`random`]) so that no checkpoint is needed.
pub mod cost;
pub mod kernels;
pub mod random;
pub mod steps;

pub use random::{random_var_builder, RandomWeights};
pub use steps::{
    expected_latency, run_step_bench, Step, StepBenchConfig, StepPreset, StepReport, StepRow,
};
