//! Benchmarks of the engine's building blocks: per-step timing against the device's measured
//! copy-bandwidth and matmul ceilings ([`steps`]), the steps' analytic bytes and FLOPs
//! ([`cost`]), the speculative loop's own cost around each target forward ([`spec_loop`]),
//! the GPU path's speed targets checked against those reports ([`targets`]), and random weights
//! at real shapes ([`random`]) so that no checkpoint is needed.
pub mod cost;
pub mod kernels;
pub mod random;
pub mod spec_loop;
pub mod steps;
pub mod targets;

pub use random::{random_var_builder, RandomWeights};
pub use spec_loop::{run_loop_bench, LoopReport, LoopRow, LOOP_MODES};
pub use steps::{
    expected_latency, run_step_bench, Step, StepBenchConfig, StepPreset, StepReport, StepRow,
};
