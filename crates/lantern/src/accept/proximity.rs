//! Latent proximity tables: for every VQ code, the other codes sorted by ascending distance
//! between codebook vectors (LANTERN §3.1). Only the first `k_max` neighbours are stored
//! (`V x k_max` indices, u16 while `V <= 65536`), never a `V x V` matrix.
//!
//! The official release ships `top_{V-1}_indices.npy` (uint16 `[V, V-1]`, raw codebook rows,
//! `torch.cdist`); [`Neighbors::from_npy`] imports it. [`Neighbors::build`] recomputes a table
//! with direct difference loops, so near-ties may order differently from cdist's
//! `x² + y² − 2xy` form: prefer the official file for bit-compatible decisions.
use super::npy::{read_npy_rows, NpyHeader};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Distance between codebook rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Squared Euclidean distance between the raw stored rows (the official default).
    L2,
    /// Squared Euclidean distance between l2-normalised rows (`x / max(‖x‖, 1e-12)`), the
    /// vectors the VQ decoder actually looks up.
    L2Normalized,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::L2 => "l2",
            Metric::L2Normalized => "l2-normalized",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Indices {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

/// The first `k_max` neighbours of every code, nearest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    vocab: usize,
    k_max: usize,
    idx: Indices,
    metric: Option<Metric>,
    fingerprint: Option<u64>,
}

/// FNV-1a (64 bit) over the little-endian bytes of the codebook, to detect a table built for a
/// different codebook.
pub fn codebook_fingerprint(codebook: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in codebook {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn check_k(k: usize, v: usize) -> Result<()> {
    if k == 0 || k >= v {
        return Err(Error::invalid(
            "neighbour count k",
            format!(
                "{k} for a codebook of {v} codes (use 1 <= k <= {})",
                v.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

fn pack(vocab: usize, k_max: usize, rows: Vec<u32>) -> Indices {
    debug_assert_eq!(rows.len(), vocab * k_max);
    if vocab <= 1 << 16 {
        Indices::U16(rows.into_iter().map(|x| x as u16).collect())
    } else {
        Indices::U32(rows)
    }
}

impl Neighbors {
    /// Computes the `k` nearest other codes of every row of a `[v, d]` row-major codebook:
    /// ascending distance, ties broken by the lower index, self excluded. Runs over all cores
    /// with O(threads · v) scratch memory.
    pub fn build(codebook: &[f32], v: usize, d: usize, k: usize, metric: Metric) -> Result<Self> {
        if v == 0 || d == 0 || codebook.is_empty() {
            return Err(Error::invalid(
                "codebook",
                "is empty (pass the VQ model's quantize.embedding.weight)",
            ));
        }
        if codebook.len() != v * d {
            return Err(Error::invalid(
                "codebook",
                format!(
                    "has {} values, expected {v} x {d} = {}",
                    codebook.len(),
                    v * d
                ),
            ));
        }
        if codebook.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid(
                "codebook",
                "contains NaN or infinite values",
            ));
        }
        check_k(k, v)?;
        let rows: Vec<f32> = match metric {
            Metric::L2 => codebook.to_vec(),
            Metric::L2Normalized => codebook
                .chunks(d)
                .flat_map(|r| {
                    let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    r.iter().map(move |x| x / n)
                })
                .collect(),
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(v);
        let mut out = vec![0u32; v * k];
        let per = v.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, chunk) in out.chunks_mut(per * k).enumerate() {
                let rows = &rows;
                s.spawn(move || {
                    // key = (distance bits << 32) | index: distances are >= 0, so the bit
                    // patterns order like the values and the key orders by (distance, index).
                    let mut cand: Vec<u64> = Vec::with_capacity(v);
                    for (r, dst) in chunk.chunks_mut(k).enumerate() {
                        let i = t * per + r;
                        let xi = &rows[i * d..(i + 1) * d];
                        cand.clear();
                        for (j, xj) in rows.chunks_exact(d).enumerate() {
                            if j != i {
                                let dist: f32 =
                                    xi.iter().zip(xj).map(|(a, b)| (a - b) * (a - b)).sum();
                                cand.push(((dist.to_bits() as u64) << 32) | j as u64);
                            }
                        }
                        if k < cand.len() {
                            cand.select_nth_unstable(k - 1);
                        }
                        cand[..k].sort_unstable();
                        for (o, c) in dst.iter_mut().zip(&cand[..k]) {
                            *o = *c as u32;
                        }
                    }
                });
            }
        });
        Ok(Self {
            vocab: v,
            k_max: k,
            idx: pack(v, k, out),
            metric: Some(metric),
            fingerprint: Some(codebook_fingerprint(codebook)),
        })
    }

    /// Imports the official neighbour table (`top_{V-1}_indices.npy`, `[V, V-1]`; uint16, also
    /// uint32 / int32 / int64), keeping the first `k` columns (all when `None`).
    pub fn from_npy(path: &Path, k: Option<usize>) -> Result<Self> {
        let keep = |h: &NpyHeader| {
            if h.rows < 2 || h.cols == 0 {
                return Err(Error::load(
                    path,
                    format!("table of shape [{}, {}] is too small", h.rows, h.cols),
                ));
            }
            let k = k.unwrap_or(h.cols);
            check_k(k, h.rows)?;
            if k > h.cols {
                return Err(Error::load(
                    path,
                    format!(
                        "holds {} neighbours per code, {k} requested (lower k)",
                        h.cols
                    ),
                ));
            }
            Ok(k)
        };
        let mut idx: Option<Indices> = None;
        let on_row = |h: &NpyHeader, code: usize, vals: &[i64]| {
            let v = h.rows;
            let store = idx.get_or_insert_with(|| {
                if v <= 1 << 16 {
                    Indices::U16(Vec::with_capacity(v * vals.len()))
                } else {
                    Indices::U32(Vec::with_capacity(v * vals.len()))
                }
            });
            for &x in vals {
                if x < 0 || x as usize >= v || x as usize == code {
                    return Err(Error::load(
                        path,
                        format!("row {code} holds neighbour {x}, not another code in 0..{v} (is this a neighbour table?)"),
                    ));
                }
                match store {
                    Indices::U16(s) => s.push(x as u16),
                    Indices::U32(s) => s.push(x as u32),
                }
            }
            Ok(())
        };
        let h = read_npy_rows(path, keep, on_row)?;
        let idx = idx.ok_or_else(|| Error::load(path, "table has no rows"))?;
        let k_max = match &idx {
            Indices::U16(s) => s.len() / h.rows,
            Indices::U32(s) => s.len() / h.rows,
        };
        Ok(Self {
            vocab: h.rows,
            k_max,
            idx,
            metric: Some(Metric::L2),
            fingerprint: None,
        })
    }

    /// Writes the table as safetensors: tensor `indices` (U16 or U32, `[V, k_max]`) and metadata
    /// `metric`, `source`, `vocab`, `k`, `codebook_fingerprint`.
    pub fn save(&self, path: &Path, source: &str) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let (dtype, bytes): (Dtype, Vec<u8>) = match &self.idx {
            Indices::U16(x) => (Dtype::U16, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
            Indices::U32(x) => (Dtype::U32, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        let werr = |e: safetensors::SafeTensorError| Error::Write {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let view = TensorView::new(dtype, vec![self.vocab, self.k_max], &bytes).map_err(werr)?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "lantern-neighbors".to_string());
        meta.insert(
            "metric".to_string(),
            self.metric.map_or("unknown", Metric::name).to_string(),
        );
        meta.insert("source".to_string(), source.to_string());
        meta.insert("vocab".to_string(), self.vocab.to_string());
        meta.insert("k".to_string(), self.k_max.to_string());
        meta.insert(
            "codebook_fingerprint".to_string(),
            self.fingerprint
                .map_or(String::new(), |f| format!("{f:016x}")),
        );
        safetensors::serialize_to_file([("indices", view)], Some(meta), path).map_err(werr)
    }

    /// Reads a table written by [`Neighbors::save`].
    pub fn load(path: &Path) -> Result<Self> {
        use safetensors::tensor::{Dtype, SafeTensors};
        let bytes = std::fs::read(path).map_err(|e| Error::load(path, e.to_string()))?;
        let not_ours = |msg: String| {
            Error::load(path, format!("{msg}: not a lantern neighbour table (build one with `lantern neighbors --vq ...`)"))
        };
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| not_ours(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some("lantern-neighbors") {
            return Err(not_ours("no `format: lantern-neighbors` metadata".into()));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| not_ours(e.to_string()))?;
        let t = st
            .tensor("indices")
            .map_err(|_| not_ours("no `indices` tensor".into()))?;
        let shape = t.shape();
        if shape.len() != 2 || shape[0] < 2 || shape[1] == 0 || shape[1] >= shape[0] {
            return Err(not_ours(format!("`indices` has shape {shape:?}")));
        }
        let (v, k) = (shape[0], shape[1]);
        let data = t.data();
        let rows: Vec<u32> = match t.dtype() {
            Dtype::U16 => data
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect(),
            Dtype::U32 => data
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            other => {
                return Err(not_ours(format!(
                    "`indices` has dtype {other:?}, expected U16 or U32"
                )))
            }
        };
        if let Some(bad) = rows.iter().find(|&&x| x as usize >= v) {
            return Err(not_ours(format!("index {bad} out of range for {v} codes")));
        }
        let metric = match meta.get("metric").map(String::as_str) {
            Some("l2") => Some(Metric::L2),
            Some("l2-normalized") => Some(Metric::L2Normalized),
            _ => None,
        };
        let fingerprint = meta
            .get("codebook_fingerprint")
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        Ok(Self {
            vocab: v,
            k_max: k,
            idx: pack(v, k, rows),
            metric,
            fingerprint,
        })
    }

    /// Number of codes.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Number of stored neighbours per code.
    pub fn k_max(&self) -> usize {
        self.k_max
    }

    /// Distance the table was built with (`None` when unknown).
    pub fn metric(&self) -> Option<Metric> {
        self.metric
    }

    /// Fingerprint of the codebook the table was built from (`None` for imported tables).
    pub fn fingerprint(&self) -> Option<u64> {
        self.fingerprint
    }

    /// The `j`-th nearest neighbour of `code` (`j < k_max`, `code < vocab`).
    #[inline]
    pub fn neighbor(&self, code: u32, j: usize) -> u32 {
        let at = code as usize * self.k_max + j;
        match &self.idx {
            Indices::U16(x) => x[at] as u32,
            Indices::U32(x) => x[at],
        }
    }

    /// All stored neighbours of `code`, nearest first.
    pub fn row(&self, code: u32) -> Vec<u32> {
        (0..self.k_max).map(|j| self.neighbor(code, j)).collect()
    }

    /// Checks that the table fits a model with `v` codes (and, when both are known, the same
    /// codebook fingerprint).
    pub fn check_codebook(&self, v: usize, fingerprint: Option<u64>) -> Result<()> {
        if v != self.vocab {
            return Err(Error::invalid(
                "neighbour table",
                format!(
                    "neighbour table was built for a codebook of {} codes, model has {v}; rebuild with `lantern neighbors --vq ...`",
                    self.vocab
                ),
            ));
        }
        if let (Some(a), Some(b)) = (self.fingerprint, fingerprint) {
            if a != b {
                return Err(Error::invalid(
                    "neighbour table",
                    format!(
                        "neighbour table was built for another codebook (fingerprint {a:016x}, model has {b:016x}); rebuild with `lantern neighbors --vq ...`"
                    ),
                ));
            }
        }
        Ok(())
    }
}
