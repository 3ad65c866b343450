//! Tiny mock target and drafters for the decoding tests.
//!
//! Target: every position j stores `v_j = E[token_j] + P[pos_j]` (class rows for the
//! condition) in a real cache; the hidden state of a query is the sum of the `v` it may attend
//! to (so it depends on the whole visible prefix, the positions and the mask), and
//! `logits = scale * tanh(h) W^T`. Drafter: `out = a * feature + E'[id] + P'[pos + 1]`; with
//! `E' = E`, `P' = P`, `a = 1` it reproduces the target exactly (a perfect drafter).
#![allow(dead_code)]
use candle_core::{DType, Device, IndexOp, Tensor};
use lantern::decode::model::{DecodeCache, DraftModel, Target, Visibility};
use lantern::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn uniform(rng: &mut StdRng, shape: (usize, usize), scale: f32) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub struct MockLm {
    pub emb: Tensor,
    pub pos: Tensor,
    pub cls: Tensor,
    pub head: Tensor,
    pub vocab: usize,
    pub block: usize,
    pub n_classes: usize,
    pub scale: f32,
}

impl MockLm {
    pub fn new(vocab: usize, dim: usize, block: usize, n_classes: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Self {
            emb: uniform(&mut rng, (vocab, dim), 0.6),
            pos: uniform(&mut rng, (block + 64, dim), 0.3),
            cls: uniform(&mut rng, (n_classes + 1, dim), 1.0),
            head: uniform(&mut rng, (vocab, dim), 1.0),
            vocab,
            block,
            n_classes,
            scale: 2.5,
        }
    }

    /// A perfect drafter (same tables as the target).
    pub fn self_drafter(&self) -> MockDrafter {
        MockDrafter {
            emb: self.emb.clone(),
            pos: self.pos.clone(),
            feat_scale: 1.0,
        }
    }

    /// An unrelated drafter.
    pub fn random_drafter(&self, seed: u64) -> MockDrafter {
        let mut rng = StdRng::seed_from_u64(seed);
        let (v, d) = self.emb.dims2().unwrap();
        MockDrafter {
            emb: uniform(&mut rng, (v, d), 0.6),
            pos: uniform(&mut rng, (self.pos.dim(0).unwrap(), d), 0.3),
            feat_scale: 0.7,
        }
    }
}

pub struct MockCache {
    pub v: Option<Tensor>,
    pub len: usize,
    pub max: usize,
}

impl MockCache {
    fn new(max: usize) -> Self {
        Self {
            v: None,
            len: 0,
            max,
        }
    }

    fn append(&mut self, v: &Tensor) -> Result<()> {
        let s = v.dim(1)?;
        if self.len + s > self.max {
            return Err(Error::invalid(
                "mock cache",
                format!("overflow {} + {s} > {}", self.len, self.max),
            ));
        }
        self.v = Some(match &self.v {
            None => v.clone(),
            Some(old) => Tensor::cat(&[old, v], 1)?,
        });
        self.len += s;
        Ok(())
    }
}

impl DecodeCache for MockCache {
    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::invalid("mock cache", "truncate past the end"));
        }
        if let Some(v) = &self.v {
            self.v = Some(v.narrow(1, 0, len)?);
        }
        self.len = len;
        Ok(())
    }

    fn keep(&mut self, start: usize, rows: &[Vec<usize>]) -> Result<()> {
        let v = self
            .v
            .as_ref()
            .ok_or_else(|| Error::invalid("mock cache", "empty"))?;
        if rows.len() != v.dim(0)? || rows.iter().any(|r| r.len() != rows[0].len()) {
            return Err(Error::invalid(
                "mock cache",
                "keep rows do not match the batch",
            ));
        }
        let mut parts = Vec::new();
        for (r, idx) in rows.iter().enumerate() {
            let ids: Vec<u32> = idx.iter().map(|&i| (start + i) as u32).collect();
            if ids.iter().any(|&i| i as usize >= self.len) {
                return Err(Error::invalid("mock cache", "keep index past the end"));
            }
            let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
            let vr = v.i(r)?;
            let kept = Tensor::cat(&[&vr.narrow(0, 0, start)?, &vr.index_select(&ids, 0)?], 0)?;
            parts.push(kept.unsqueeze(0)?);
        }
        self.v = Some(Tensor::cat(&parts, 0)?);
        self.len = start + rows[0].len();
        Ok(())
    }
}

/// Rows of a position table for `[s]` (`[1, s, d]`) or `[rows, s]` (`[rows, s, d]`) positions.
fn pos_rows(table: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let d = table.dim(1)?;
    let p = table.index_select(&positions.flatten_all()?, 0)?;
    Ok(match positions.dims() {
        [s] => p.reshape((1, *s, d))?,
        [r, s] => p.reshape((*r, *s, d))?,
        other => {
            return Err(Error::invalid(
                "mock positions",
                format!("shape {other:?}, expected [s] or [rows, s]"),
            ))
        }
    })
}

/// 0/1 visibility `[rows, s, past + s]`.
fn visibility(vis: &Visibility, rows: usize, s: usize, past: usize) -> Result<Tensor> {
    match vis {
        Visibility::Causal => {
            let m: Vec<f32> = (0..s)
                .flat_map(|i| (0..past + s).map(move |j| if j <= past + i { 1.0 } else { 0.0 }))
                .collect();
            Ok(Tensor::from_vec(m, (1, s, past + s), &Device::Cpu)?.repeat((rows, 1, 1))?)
        }
        Visibility::Custom(m) => {
            if m.dims() != [rows, s, past + s] {
                return Err(Error::invalid(
                    "mock mask",
                    format!("shape {:?}, expected {:?}", m.dims(), [rows, s, past + s]),
                ));
            }
            Ok(m.ge(-1e30)?.to_dtype(DType::F32)?)
        }
    }
}

impl Target for MockLm {
    type Condition = Vec<u32>;
    type Cache = MockCache;

    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn block_size(&self) -> usize {
        self.block
    }
    fn cond_len(&self) -> usize {
        1
    }
    fn num_images(&self, cond: &Vec<u32>) -> usize {
        cond.len()
    }
    fn new_cache(&self, _rows: usize, max_len: usize) -> Result<MockCache> {
        Ok(MockCache::new(max_len))
    }
    fn prefill(&self, cond: &Vec<u32>, with_uncond: bool, cache: &mut MockCache) -> Result<Tensor> {
        let mut ids = cond.clone();
        if with_uncond {
            ids.extend(std::iter::repeat_n(self.n_classes as u32, cond.len()));
        }
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
        let v = self
            .cls
            .index_select(&ids, 0)?
            .broadcast_add(&self.pos.i(0)?)?
            .unsqueeze(1)?;
        cache.append(&v)?;
        Ok(v)
    }
    fn forward_tokens(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        vis: &Visibility,
        cache: &mut MockCache,
    ) -> Result<Tensor> {
        let (rows, s) = tokens.dims2()?;
        let d = self.emb.dim(1)?;
        let e = self
            .emb
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((rows, s, d))?;
        let v = e.broadcast_add(&pos_rows(&self.pos, positions)?)?;
        let past = cache.len;
        let all = match &cache.v {
            None => v.clone(),
            Some(old) => Tensor::cat(&[old, &v], 1)?,
        };
        let w = visibility(vis, rows, s, past)?;
        let h = w.matmul(&all)?;
        cache.append(&v)?;
        Ok(h)
    }
    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok((hidden.tanh()?.broadcast_matmul(&self.head.t()?)? * self.scale as f64)?)
    }
}

pub struct MockDrafter {
    pub emb: Tensor,
    pub pos: Tensor,
    pub feat_scale: f32,
}

impl DraftModel for MockDrafter {
    type Cache = MockCache;

    fn new_cache(&self, _rows: usize, max_len: usize) -> Result<MockCache> {
        Ok(MockCache::new(max_len))
    }
    fn forward(
        &self,
        ids: &Tensor,
        features: &Tensor,
        positions: &Tensor,
        vis: &Visibility,
        cache: &mut MockCache,
    ) -> Result<Tensor> {
        let (rows, s) = ids.dims2()?;
        let d = self.emb.dim(1)?;
        // check the mask shape against the cache
        visibility(vis, rows, s, cache.len)?;
        let e = self
            .emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((rows, s, d))?;
        let p = pos_rows(&self.pos, &(positions + 1.0)?)?;
        let out = ((features * self.feat_scale as f64)? + e)?.broadcast_add(&p)?;
        cache.append(&out)?;
        Ok(out)
    }
}
