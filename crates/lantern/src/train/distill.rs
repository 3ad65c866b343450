//! Drafter training data (spec §6.2 adapted to class-conditional targets): the target runs
//! teacher-forced, without a cache, over real token sequences; its post-final-norm features
//! are stored in f16 with the tokens and the labels it saw (10% replaced by the null class, so
//! the drafter also learns the unconditional CFG half).
//!
//! Layout of `out_dir`: `distill.json` ([`DistillManifest`]) and `chunk_00000.safetensors`, …
//! with `chunk_size` sequences each (the last real chunk and the last self-generated chunk may
//! be shorter). Each chunk holds `features` f16 `[n, L, dim]`, `tokens` u32 `[n, L]` and
//! `labels` u32 `[n]`, where `L` = image tokens and `features[:, i]` is the feature of the
//! target position that predicts `tokens[:, i]` (position `cls_token_num - 1 + i`). Chunks are
//! written through a temporary file and a rename; a rerun skips the chunks that exist.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::TokenDataset;
use crate::models::llamagen::{AttnMask, Condition, LlamaGen, ModelType};
use crate::sampling::{cfg_mix, sample_index, SamplingParams};
use crate::{Error, Result};

/// Settings of a distillation run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Sequences per chunk file.
    pub chunk_size: usize,
    /// Sequences per target forward.
    pub batch_size: usize,
    /// Probability of feeding the null class instead of the label.
    pub class_dropout: f64,
    /// Seed of the label dropout and of self-generation (per chunk, so reruns agree).
    pub seed: u64,
    /// Use only the first `max_sequences` sequences of the dataset (`None` = all).
    pub max_sequences: Option<usize>,
    /// Extra sequences sampled by the target itself (random classes, CFG), appended after the
    /// real ones.
    pub self_generated: usize,
    /// CFG scale of self-generation.
    pub gen_cfg_scale: f32,
    /// Sampling of self-generation (LlamaGen order: temperature, top-k, top-p).
    pub gen_temperature: f32,
    /// Top-k of self-generation (`0` = off).
    pub gen_top_k: usize,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            chunk_size: 256,
            batch_size: 32,
            class_dropout: 0.1,
            seed: 0,
            max_sequences: None,
            self_generated: 0,
            gen_cfg_scale: 2.0,
            gen_temperature: 1.0,
            gen_top_k: 0,
        }
    }
}

/// `distill.json`: what the chunks of a folder contain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillManifest {
    /// Target width (feature size).
    pub dim: usize,
    /// Image tokens per sequence.
    pub seq_len: usize,
    /// Target vocabulary.
    pub vocab_size: usize,
    /// Null class id (= number of classes).
    pub null_class: u32,
    /// Sequences per chunk.
    pub chunk_size: usize,
    /// Real sequences (teacher-forced dataset codes), stored first.
    pub real_sequences: usize,
    /// Self-generated sequences, stored after the real ones.
    pub self_generated: usize,
    /// Seed of the run.
    pub seed: u64,
    /// Label dropout probability.
    pub class_dropout: f64,
}

impl DistillManifest {
    /// File name inside the data folder.
    pub const FILE: &'static str = "distill.json";

    /// Chunks of real (dataset) sequences; they come first.
    pub fn real_chunks(&self) -> usize {
        self.real_sequences.div_ceil(self.chunk_size)
    }

    /// Total number of chunks.
    pub fn num_chunks(&self) -> usize {
        self.real_chunks() + self.self_generated.div_ceil(self.chunk_size)
    }

    /// Sequences in chunk `i`, and whether they are self-generated.
    pub fn chunk_len(&self, i: usize) -> (usize, bool) {
        let rc = self.real_chunks();
        let (total, start, generated) = if i < rc {
            (self.real_sequences, i * self.chunk_size, false)
        } else {
            (self.self_generated, (i - rc) * self.chunk_size, true)
        };
        (total.saturating_sub(start).min(self.chunk_size), generated)
    }
}

/// File name of chunk `i`.
pub fn chunk_name(i: usize) -> String {
    format!("chunk_{i:05}.safetensors")
}

/// What a distillation run did.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillReport {
    /// Chunks the folder holds when complete.
    pub chunks_total: usize,
    /// Chunks written by this run.
    pub chunks_written: usize,
    /// Chunks found complete and skipped.
    pub chunks_skipped: usize,
    /// Sequences written by this run.
    pub sequences_written: usize,
    /// Wall time in seconds.
    pub seconds: f64,
}

fn werr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Writes the training data of a drafter for `target` into `out_dir` (resumable: existing
/// chunks are kept). `progress(done, total)` is called after every chunk.
pub fn distill(
    target: &LlamaGen,
    data: &TokenDataset,
    out_dir: &Path,
    cfg: &DistillConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DistillReport> {
    let start = Instant::now();
    let tc = target.config();
    if tc.model_type != ModelType::C2i {
        return Err(Error::invalid(
            "distill",
            "only class-conditional (c2i) targets are supported; pass a c2i GPT",
        ));
    }
    if data.seq_len() != tc.block_size || data.vocab > tc.vocab_size {
        return Err(Error::invalid(
            "token dataset",
            format!(
                "{} tokens over {} codes, the target expects {} over {}; tokenize with the matching VQ model",
                data.seq_len(), data.vocab, tc.block_size, tc.vocab_size
            ),
        ));
    }
    if let Some(&l) = data.labels.iter().find(|&&l| l as usize >= tc.num_classes) {
        return Err(Error::invalid(
            "token dataset",
            format!("label {l} but the target has {} classes", tc.num_classes),
        ));
    }
    if cfg.chunk_size == 0 || cfg.batch_size == 0 {
        return Err(Error::invalid(
            "distill",
            "chunk_size and batch_size must be at least 1",
        ));
    }
    let manifest = DistillManifest {
        dim: tc.dim,
        seq_len: tc.block_size,
        vocab_size: tc.vocab_size,
        null_class: tc.num_classes as u32,
        chunk_size: cfg.chunk_size,
        real_sequences: cfg.max_sequences.unwrap_or(data.len()).min(data.len()),
        self_generated: cfg.self_generated,
        seed: cfg.seed,
        class_dropout: cfg.class_dropout,
    };
    std::fs::create_dir_all(out_dir).map_err(|e| werr(out_dir, e))?;
    let mpath = out_dir.join(DistillManifest::FILE);
    if mpath.exists() {
        let old = read_manifest(&mpath)?;
        if old != manifest {
            return Err(Error::invalid(
                "distill",
                format!(
                    "{} was written with other settings or another target; use a new folder or the same settings",
                    mpath.display()
                ),
            ));
        }
    } else {
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::invalid("manifest", e.to_string()))?;
        crate::image::write_atomic(&mpath, text.as_bytes(), true)?;
    }
    let total = manifest.num_chunks();
    let mut report = DistillReport {
        chunks_total: total,
        chunks_written: 0,
        chunks_skipped: 0,
        sequences_written: 0,
        seconds: 0.0,
    };
    let params = SamplingParams {
        temperature: cfg.gen_temperature,
        top_k: cfg.gen_top_k,
        top_p: 1.0,
    };
    params.validate()?;
    for c in 0..total {
        let path = out_dir.join(chunk_name(c));
        if path.exists() {
            report.chunks_skipped += 1;
            progress(c + 1, total);
            continue;
        }
        let (n, generated) = manifest.chunk_len(c);
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(cfg.seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        let (tokens, labels) = if generated {
            let labels: Vec<u32> = (0..n)
                .map(|_| rng.random_range(0..tc.num_classes as u32))
                .collect();
            let mut toks = Vec::with_capacity(n * tc.block_size);
            for lb in labels.chunks(cfg.batch_size) {
                for seq in generate(target, lb, cfg.gen_cfg_scale, &params, &mut rng)? {
                    toks.extend(seq);
                }
            }
            (toks, labels)
        } else {
            let first = c * cfg.chunk_size;
            let toks = data.tokens[first * tc.block_size..(first + n) * tc.block_size].to_vec();
            (toks, data.labels[first..first + n].to_vec())
        };
        let fed: Vec<u32> = labels
            .iter()
            .map(|&l| {
                if rng.random::<f64>() < cfg.class_dropout {
                    manifest.null_class
                } else {
                    l
                }
            })
            .collect();
        let features = teacher_features(target, &tokens, &fed, cfg.batch_size)?;
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert("features".to_string(), features);
        map.insert(
            "tokens".to_string(),
            Tensor::from_vec(tokens, (n, tc.block_size), &dev)?,
        );
        map.insert("labels".to_string(), Tensor::from_vec(fed, n, &dev)?);
        let tmp = out_dir.join(format!(".{}.tmp", chunk_name(c)));
        candle_core::safetensors::save(&map, &tmp).map_err(|e| werr(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| werr(&path, e))?;
        report.chunks_written += 1;
        report.sequences_written += n;
        progress(c + 1, total);
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Post-norm target features of the positions that predict each token, f16 on the CPU.
///
/// # Shapes
/// - `tokens`: `n * L` codes, `labels`: `n` (null class allowed) → `[n, L, dim]` f16
pub fn teacher_features(
    target: &LlamaGen,
    tokens: &[u32],
    labels: &[u32],
    batch: usize,
) -> Result<Tensor> {
    let tc = target.config();
    let (l, cls) = (tc.block_size, tc.cls_token_num);
    let dev = target.device();
    let mut out = Vec::new();
    for (bi, lb) in labels.chunks(batch.max(1)).enumerate() {
        let first = bi * batch.max(1);
        let toks = &tokens[first * l..(first + lb.len()) * l];
        let t = Tensor::from_slice(toks, (lb.len(), l), dev)?.narrow(1, 0, l - 1)?;
        let cond = target.embed_condition(&Condition::Classes(lb.to_vec()))?;
        let (h, _) = target.forward_train(&cond, &t, None)?;
        out.push(
            h.narrow(1, cls - 1, l)?
                .to_dtype(DType::F16)?
                .to_device(&Device::Cpu)?,
        );
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Samples one token sequence per label with the target (KV cache, CFG with the null class).
pub fn generate<R: Rng>(
    target: &LlamaGen,
    labels: &[u32],
    cfg_scale: f32,
    params: &SamplingParams,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    let tc = target.config();
    let (b, l, cls) = (labels.len(), tc.block_size, tc.cls_token_num);
    let dev = target.device().clone();
    let mut all = labels.to_vec();
    all.extend(std::iter::repeat_n(tc.num_classes as u32, b));
    let cond = target.embed_condition(&Condition::Classes(all))?;
    let mut cache = target.new_cache(2 * b, target.cache_len(0))?;
    let pos = Tensor::arange(0u32, cls as u32, &dev)?;
    let h = target.forward(&cond, &pos, &AttnMask::Causal, &mut cache)?;
    let mut logits = target.lm_head(&h.narrow(1, cls - 1, 1)?)?;
    let mut seqs = vec![Vec::with_capacity(l); b];
    for i in 0..l {
        let rows = logits.squeeze(1)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(2 * b);
        for (k, seq) in seqs.iter_mut().enumerate() {
            let mixed = cfg_mix(&rows[k], &rows[b + k], cfg_scale);
            let t = sample_index(&params.probs(&mixed), rng) as u32;
            seq.push(t);
            next.push(t);
        }
        if i + 1 == l {
            break;
        }
        next.extend_from_within(..);
        let ids = Tensor::from_vec(next, (2 * b, 1), &dev)?;
        let x = target.embed_tokens(&ids)?;
        let p = Tensor::new(&[(cls + i) as u32], &dev)?;
        let h = target.forward(&x, &p, &AttnMask::Causal, &mut cache)?;
        logits = target.lm_head(&h)?;
    }
    Ok(seqs)
}

fn read_manifest(path: &Path) -> Result<DistillManifest> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::load(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::load(
            path,
            format!("{e} (not a distill manifest; rerun distill into a new folder)"),
        )
    })
}

/// One chunk in memory.
#[derive(Debug, Clone)]
pub struct DrafterChunk {
    /// `[n, L, dim]` f16 (CPU): feature that predicts token `i` at index `i`.
    pub features: Tensor,
    /// `[n, L]` u32 codes.
    pub tokens: Tensor,
    /// Labels the target saw (null class = unconditional half).
    pub labels: Vec<u32>,
}

/// Reader of a distilled folder; loads one chunk at a time.
#[derive(Debug, Clone)]
pub struct DrafterData {
    dir: PathBuf,
    /// Contents description.
    pub manifest: DistillManifest,
    /// Indices of the chunks present on disk.
    pub chunks: Vec<usize>,
}

impl DrafterData {
    /// Opens a folder written by [`distill`] (complete chunks only).
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join(DistillManifest::FILE);
        if !mpath.exists() {
            return Err(Error::load(
                dir,
                "no distill.json; run distill first or pass its output folder",
            ));
        }
        let manifest = read_manifest(&mpath)?;
        let chunks: Vec<usize> = (0..manifest.num_chunks())
            .filter(|&i| dir.join(chunk_name(i)).exists())
            .collect();
        if chunks.is_empty() {
            return Err(Error::load(
                dir,
                "no chunk files; run distill to completion first",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            chunks,
        })
    }

    /// Sequences in chunk `i` (from the manifest, without reading it).
    pub fn chunk_len(&self, i: usize) -> usize {
        self.manifest.chunk_len(i).0
    }

    /// Loads chunk `i` on the CPU and checks its shapes.
    pub fn load_chunk(&self, i: usize) -> Result<DrafterChunk> {
        let path = self.dir.join(chunk_name(i));
        let mut map = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            Error::load(
                &path,
                format!("unreadable chunk ({e}); delete it and rerun distill"),
            )
        })?;
        let mut take = |k: &str| {
            map.remove(k).ok_or_else(|| {
                Error::load(
                    &path,
                    format!("no `{k}` tensor; delete it and rerun distill"),
                )
            })
        };
        let (features, tokens, labels) = (take("features")?, take("tokens")?, take("labels")?);
        let m = &self.manifest;
        let n = self.chunk_len(i);
        if features.dims() != [n, m.seq_len, m.dim]
            || tokens.dims() != [n, m.seq_len]
            || labels.dims() != [n]
        {
            return Err(Error::load(
                &path,
                "chunk shapes disagree with distill.json; delete it and rerun distill",
            ));
        }
        Ok(DrafterChunk {
            features,
            tokens: tokens.to_dtype(DType::U32)?,
            labels: labels.to_dtype(DType::U32)?.to_vec1::<u32>()?,
        })
    }

    /// Streams the chunks in `order` (indices into the folder's chunks), one in memory at a time.
    pub fn iter<'a>(
        &'a self,
        order: &'a [usize],
    ) -> impl Iterator<Item = Result<(usize, DrafterChunk)>> + 'a {
        order
            .iter()
            .map(move |&c| self.load_chunk(c).map(|d| (c, d)))
    }
}
