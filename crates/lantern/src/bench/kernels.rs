//! Where a step's time goes: GPU time of each kernel of one transformer layer at a preset's
//! shapes (batch rows x 1 token and x the tree's tokens), next to its bandwidth bound. Each op
//! is captured `REPS` times into one CUDA graph and replayed, so the figure is GPU time per
//! launch inside a graph (what the decoding loops replay), without host launch costs.
use std::fmt;

use candle_core::{DType, Device, Tensor};

use super::steps::StepBenchConfig;
use crate::fused::{self, Epilogue, Heads, KeyMask};
use crate::Result;

/// Repetitions of an op inside the timed graph.
const REPS: usize = 64;
/// Bytes the copies of a weight span together (over the H100's 50 MB L2).
const L2_SPAN: f64 = 200e6;

/// One op's time.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRow {
    /// What ran.
    pub name: String,
    /// Tokens per batch row.
    pub tokens: usize,
    /// GPU time per launch in a graph, µs.
    pub us: f64,
    /// Compulsory bytes read + written.
    pub bytes: f64,
    /// `bytes / copy bandwidth`, µs.
    pub bound_us: f64,
}

/// Result of [`run_kernel_bench`]: per-op rows for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelReport {
    pub layers: usize,
    pub rows: Vec<KernelRow>,
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "one layer's kernels ({} layers per step; GPU time per launch in a CUDA graph of {REPS}):",
            self.layers
        )?;
        writeln!(
            f,
            "| op | tokens | µs | MB moved | bandwidth bound µs | efficiency |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1}% |",
                r.name,
                r.tokens,
                r.us,
                r.bytes / 1e6,
                r.bound_us,
                100.0 * r.bound_us / r.us
            )?;
        }
        Ok(())
    }
}

/// Copies of a `bytes`-sized buffer that together span [`L2_SPAN`] (1 to 16).
fn l2_copies(bytes: f64) -> usize {
    (L2_SPAN / bytes).ceil().clamp(1.0, 16.0) as usize
}

/// GPU µs per repetition of `f`, captured `REPS` times into one graph (best of 5 replays).
#[cfg(feature = "cuda")]
fn graph_us(device: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use std::time::Instant;
    let Device::Cuda(cuda) = device else {
        return Err(crate::Error::invalid("kernel bench", "needs a CUDA device"));
    };
    let wrap = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        crate::Error::invalid("kernel bench", format!("{e:?}"))
    };
    let _htod = cuda.enable_cuda_graph_htod_cache();
    f()?;
    device.synchronize()?;
    let stream = cuda.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(wrap)?;
    let ran = (0..REPS).try_for_each(|_| f());
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .map_err(wrap)?;
    ran?;
    let Some(graph) = graph else {
        return Err(crate::Error::invalid("kernel bench", "empty capture"));
    };
    graph.launch().map_err(wrap)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        graph.launch().map_err(wrap)?;
        device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best * 1e6 / REPS as f64)
}

#[cfg(not(feature = "cuda"))]
fn graph_us(_device: &Device, _f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    Err(crate::Error::invalid(
        "kernel bench",
        "needs a CUDA build (--features cuda)",
    ))
}

/// Times every kernel of one target layer at 1 token and at `cfg.tree_tokens` tokens per row
/// (CUDA only; `copy_gbps` from the step bench's ceiling).
pub fn run_kernel_bench(
    cfg: &StepBenchConfig,
    copy_gbps: f64,
    device: &Device,
) -> Result<KernelReport> {
    let t = cfg.preset.target();
    let (b, d, f) = (cfg.batch, t.dim, t.ffn_hidden);
    let heads = Heads {
        h: t.n_head,
        kvh: t.n_kv_head,
        hd: t.head_dim(),
    };
    let dt = cfg.dtype;
    let el = dt.size_in_bytes() as f64;
    let w = |rows: usize, cols: usize| -> Result<Tensor> {
        Ok((Tensor::randn(0f32, 0.02, (rows, cols), device)?).to_dtype(dt)?)
    };
    let qkv_w = (heads.h + 2 * heads.kvh) * heads.hd;
    // weights cycle through copies larger than the L2 cache together, like a model's layers
    let copies = |rows: usize, cols: usize| -> Result<Vec<Tensor>> {
        (0..l2_copies((rows * cols) as f64 * el))
            .map(|_| w(rows, cols))
            .collect()
    };
    let (wqkv, wo, w13, w2) = (
        copies(qkv_w, d)?,
        copies(d, d)?,
        copies(2 * f, d)?,
        copies(d, f)?,
    );
    let norm_w = Tensor::ones(d, dt, device)?;
    let s_max = cfg.tree_tokens;
    let max_len = cfg.prefix_len + 2 * s_max;
    let kv = Tensor::zeros((2, 1, b, heads.kvh, max_len, heads.hd), dt, device)?;
    let attention_ok = fused::supports_head_dim(&kv, heads.hd);
    let mut rows = Vec::new();
    let bw = copy_gbps * 1e3; // bytes per µs
    for s in [1, s_max] {
        let n = b * s;
        let x = Tensor::randn(0f32, 1.0, (b, s, d), device)?.to_dtype(dt)?;
        let r = Tensor::randn(0f32, 1.0, (b, s, d), device)?.to_dtype(dt)?;
        let qkv = Tensor::randn(0f32, 1.0, (b, s, qkv_w), device)?.to_dtype(dt)?;
        let gu = Tensor::randn(0f32, 1.0, (b, s, 2 * f), device)?.to_dtype(dt)?;
        let hmid = Tensor::randn(0f32, 1.0, (b, s, f), device)?.to_dtype(dt)?;
        let rope = Tensor::ones((1, s, heads.hd / 2, 2), DType::F32, device)?;
        let mask = KeyMask::Additive(Tensor::zeros((b, 1, s, max_len), DType::F32, device)?);
        let at = max_len - s_max;
        let act = |cols: usize| (n * cols) as f64 * el;
        let mut row =
            |name: &str, bytes: f64, f: &mut dyn FnMut(usize) -> Result<()>| -> Result<()> {
                let mut i = 0;
                let us = graph_us(device, &mut || {
                    i += 1;
                    f(i)
                })?;
                rows.push(KernelRow {
                    name: name.to_string(),
                    tokens: s,
                    us,
                    bytes,
                    bound_us: bytes / bw,
                });
                Ok(())
            };
        row("norm + residual", act(d) * 4.0, &mut |_| {
            fused::add_rms_norm(&x, &r, &norm_w, 1e-5)?;
            Ok(())
        })?;
        let kv_bytes = (b * heads.kvh * heads.hd * 2) as f64 * el;
        if attention_ok {
            row(
                "rope + K/V write",
                act(qkv_w) + kv_bytes * s as f64,
                &mut |_| {
                    fused::write_kv(&kv, &qkv, &rope, 0, at, heads)?;
                    Ok(())
                },
            )?;
            row(
                &format!("attention over {max_len} keys"),
                act(qkv_w) + kv_bytes * max_len as f64 + act(d),
                &mut |_| {
                    fused::attention(&qkv, &rope, &kv, 0, max_len, &mask, heads)?;
                    Ok(())
                },
            )?;
            if s > 1 {
                row(
                    &format!("attention + K/V write over {max_len} keys"),
                    act(qkv_w) + kv_bytes * (max_len + s) as f64 + act(d),
                    &mut |_| {
                        fused::attention_write_kv(&qkv, &rope, &kv, 0, at, max_len, &mask, heads)?;
                        Ok(())
                    },
                )?;
            }
        }
        row("silu * up", act(2 * f) + act(f), &mut |_| {
            fused::silu_mul(&gu)?;
            Ok(())
        })?;
        let wbytes = |ws: &[Tensor]| ws[0].elem_count() as f64 * el;
        let mms: [(&str, &[Tensor], &Tensor); 4] = [
            ("wqkv", &wqkv, &x),
            ("wo", &wo, &x),
            ("w1|w3", &w13, &x),
            ("w2", &w2, &hmid),
        ];
        for (name, ws, input) in mms {
            let (o, i) = ws[0].dims2()?;
            let x2 = input.reshape((n, i))?;
            let bytes = wbytes(ws) + act(i) + act(o);
            // the model's projection path (candle's matmul, or cuBLASLt under LANTERN_GEMM)
            let lins: Vec<_> = ws
                .iter()
                .map(|w| candle_nn::Linear::new(w.clone(), None))
                .collect();
            row(&format!("{name} matmul {o}x{i}"), bytes, &mut |k| {
                fused::linear(&lins[k % lins.len()], &x2)?;
                Ok(())
            })?;
        }
        if n > fused::SMALL_ROWS && n <= fused::SPLIT_K_MAX_ROWS {
            // the many-row block's wo and w2 with the norm after them: the split-K pair (two
            // kernels; opt-in, turned on here), against the rows above' matmul and norm
            fused::set_split_k(Some(true));
            let (lo, l2): (Vec<_>, Vec<_>) = wo
                .iter()
                .zip(&w2)
                .map(|(a, b)| {
                    (
                        candle_nn::Linear::new(a.clone(), None),
                        candle_nn::Linear::new(b.clone(), None),
                    )
                })
                .unzip();
            row(
                "split-k wo + residual + norm",
                wbytes(&wo) + act(d) * 4.0,
                &mut |k| {
                    fused::linear_add_rms_norm(&x, &lo[k % lo.len()], false, &r, &norm_w, 1e-5)?;
                    Ok(())
                },
            )?;
            row(
                "split-k swiglu + w2 + residual + norm",
                wbytes(&w2) + act(2 * f) + act(d) * 3.0,
                &mut |k| {
                    fused::linear_add_rms_norm(&gu, &l2[k % l2.len()], true, &r, &norm_w, 1e-5)?;
                    Ok(())
                },
            )?;
            fused::set_split_k(None);
        }
        if fused::small_linear_fits(n, d, dt) && fused::small_linear_fits(n, f, dt) {
            let nw = Some((&norm_w, 1e-5f32));
            row(
                "small wqkv + norm",
                wbytes(&wqkv) + act(d) + act(qkv_w),
                &mut |k| {
                    fused::small_linear(&x, &wqkv[k % wqkv.len()], nw, Epilogue::None)?;
                    Ok(())
                },
            )?;
            if attention_ok && s == 1 {
                let kv_bytes = (b * heads.kvh * heads.hd * 2) as f64 * el;
                row(
                    "small wqkv + norm + K/V write",
                    wbytes(&wqkv) + act(d) + act(qkv_w) + kv_bytes,
                    &mut |k| {
                        fused::small_linear_kv(
                            &x,
                            &wqkv[k % wqkv.len()],
                            nw,
                            &kv,
                            &rope,
                            0,
                            at,
                            heads,
                        )?;
                        Ok(())
                    },
                )?;
            }
            row(
                "small wo + residual",
                wbytes(&wo) + act(d) * 3.0,
                &mut |k| {
                    fused::small_linear(&x, &wo[k % wo.len()], None, Epilogue::Residual(&r))?;
                    Ok(())
                },
            )?;
            row(
                "small w1|w3 + norm + swiglu",
                wbytes(&w13) + act(d) + act(f),
                &mut |k| {
                    fused::small_linear(&x, &w13[k % w13.len()], nw, Epilogue::SwiGlu)?;
                    Ok(())
                },
            )?;
            row(
                "small w2 + residual",
                wbytes(&w2) + act(f) + act(d) * 2.0,
                &mut |k| {
                    fused::small_linear(&hmid, &w2[k % w2.len()], None, Epilogue::Residual(&r))?;
                    Ok(())
                },
            )?;
        }
    }
    Ok(KernelReport {
        layers: t.n_layer,
        rows,
    })
}

/// The probes [`run_read_probes`] times against each weight size.
pub const READ_PROBES: [fused::probe::ReadProbe; 7] = {
    use fused::probe::ReadProbe::{Bulk, Loads};
    [
        Loads {
            unroll: 1,
            blocks_per_sm: 8,
        },
        Loads {
            unroll: 4,
            blocks_per_sm: 4,
        },
        Loads {
            unroll: 8,
            blocks_per_sm: 8,
        },
        Bulk {
            chunk: 16 * 1024,
            stages: 12,
            blocks_per_sm: 1,
        },
        Bulk {
            chunk: 32 * 1024,
            stages: 6,
            blocks_per_sm: 1,
        },
        Bulk {
            chunk: 8 * 1024,
            stages: 12,
            blocks_per_sm: 2,
        },
        Bulk {
            chunk: 4 * 1024,
            stages: 12,
            blocks_per_sm: 4,
        },
    ]
};

/// What a weight-streaming kernel could reach: each of [`READ_PROBES`] reads buffers the size
/// of one layer's weight matrices (cycling through copies larger than the L2 cache), timed
/// like [`run_kernel_bench`]'s rows (CUDA only).
pub fn run_read_probes(
    cfg: &StepBenchConfig,
    copy_gbps: f64,
    device: &Device,
) -> Result<KernelReport> {
    let t = cfg.preset.target();
    let (d, f) = (t.dim, t.ffn_hidden);
    let qkv_w = (t.n_head + 2 * t.n_kv_head) * t.head_dim();
    let el = cfg.dtype.size_in_bytes();
    let bw = copy_gbps * 1e3;
    let mut rows = Vec::new();
    for (name, elems) in [
        ("wo", d * d),
        ("w2", d * f),
        ("wqkv", qkv_w * d),
        ("w1|w3", 2 * f * d),
    ] {
        let bytes = (elems * el) as f64;
        let n = l2_copies(bytes);
        let bufs = (0..n)
            .map(|_| Tensor::zeros(elems, cfg.dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for probe in READ_PROBES {
            let mut i = 0;
            let us = graph_us(device, &mut || {
                i += 1;
                fused::probe::read_probe(&bufs[i % n], probe)?;
                Ok(())
            })?;
            rows.push(KernelRow {
                name: format!("read {name} ({:.1} MB): {probe}", bytes / 1e6),
                tokens: 0,
                us,
                bytes,
                bound_us: bytes / bw,
            });
        }
    }
    Ok(KernelReport {
        layers: t.n_layer,
        rows,
    })
}
