//! Read-bandwidth probes for the kernel bench: how fast one kernel can stream a buffer the size
//! of a weight matrix, with ordinary loads or with Hopper's bulk asynchronous copies (TMA) into
//! shared memory. They compute nothing useful; they say what a weight-streaming kernel of that
//! size could reach, next to what ours reach.
use candle_core::{Result, Tensor};

/// How a probe reads its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadProbe {
    /// 16-byte loads, `unroll` (1, 4 or 8) in flight per thread, 256 threads per block,
    /// `blocks_per_sm` blocks per multiprocessor striding over the buffer.
    Loads { unroll: usize, blocks_per_sm: usize },
    /// Bulk copies of `chunk` bytes into `stages` shared-memory stages per block (sm_90),
    /// `blocks_per_sm` blocks per multiprocessor, each streaming one contiguous share.
    Bulk {
        chunk: usize,
        stages: usize,
        blocks_per_sm: usize,
    },
}

impl std::fmt::Display for ReadProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Loads {
                unroll,
                blocks_per_sm,
            } => write!(f, "loads x{unroll}, {blocks_per_sm} blocks/SM"),
            Self::Bulk {
                chunk,
                stages,
                blocks_per_sm,
            } => write!(
                f,
                "bulk {stages} x {} KB, {blocks_per_sm} blocks/SM",
                chunk / 1024
            ),
        }
    }
}

/// Streams all of `buf` (contiguous, on a CUDA device) once, as `probe` says.
pub fn read_probe(buf: &Tensor, probe: ReadProbe) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        super::cuda::read_probe(buf, probe)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (buf, probe);
        candle_core::bail!("read probes need a CUDA build (--features cuda)")
    }
}
