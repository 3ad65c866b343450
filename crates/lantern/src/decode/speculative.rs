//! Speculative decoding: draft a tree with the drafter, verify it in one target forward with a
//! tree attention mask, accept a path, compact the target cache, feed the drafter, repeat.
//!
//! Batches of images run in lock step: each step every image verifies its own tree (all trees
//! in one batched forward; columns are grouped by depth so that one `[s]` position vector
//! serves every image, with padding columns where trees differ), then every image commits the
//! same number of tokens `m = min over images of (accepted + 1)`. Cutting an image's accepted
//! path short is still exact: whether a token is kept depends only on earlier acceptances and
//! on other images. Caches thus keep one length for the whole batch (the price: with several
//! images, tau is the minimum over images of each step's accepted length).
use super::draft::{draft_static, Expand};
use super::dynamic::draft_dynamic;
use super::model::{DecodeCache, DraftModel, Target, Visibility};
use super::static_trees::TreeSpec;
use super::tree::DraftTree;
use super::{cfg_row, token_budget, DecodeStats, GenerateOptions, Output};
use crate::accept::{accept_tree, AcceptConfig, Neighbors, TargetRows};
use crate::sampling::{sample_index, softmax, SamplingParams};
use crate::{Error, Result};
use candle_core::{Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::time::Instant;

/// Probabilities of a CFG-combined logit row: the sampling distribution, or plain softmax when
/// greedy (so that drafters can rank and relaxed greedy rules see real probabilities).
fn row_probs(sampling: &SamplingParams, logits: &[f32]) -> Vec<f32> {
    if sampling.is_greedy() {
        softmax(logits)
    } else {
        sampling.probs(logits)
    }
}

/// Target rows of one image, pulled off the device on demand from the CFG-combined
/// verification logits `[n_img, cols, V]`.
struct LazyRows<'a> {
    mixed: &'a Tensor,
    g: usize,
    cols: &'a [usize],
    sampling: &'a SamplingParams,
    memo: HashMap<usize, Vec<f32>>,
}

impl TargetRows for LazyRows<'_> {
    fn row(&mut self, node: usize) -> Result<Vec<f32>> {
        if let Some(r) = self.memo.get(&node) {
            return Ok(r.clone());
        }
        let col = *self.cols.get(node).ok_or_else(|| {
            Error::invalid("tree node", format!("{node} is not in the verified tree"))
        })?;
        let l: Vec<f32> = self.mixed.i((self.g, col))?.to_vec1()?;
        let p = row_probs(self.sampling, &l);
        self.memo.insert(node, p.clone());
        Ok(p)
    }
}

/// CFG on the device: `[rows, s, V]` logits to `[n_img, s, V]` (`u + scale (c - u)`).
fn cfg_mix_device(logits: Tensor, n_img: usize, cfg: Option<f32>) -> Result<Tensor> {
    Ok(match cfg {
        Some(scale) => {
            let c = logits.narrow(0, 0, n_img)?;
            let u = logits.narrow(0, n_img, n_img)?;
            (&u + ((&c - &u)? * scale as f64)?)?
        }
        None => logits,
    })
}

/// Per-image CFG'd drafter probabilities of drafter features `[rows, s, d]` (CFG on the
/// device, then one transfer).
fn drafter_probs<T: Target>(
    target: &T,
    feats: &Tensor,
    n_img: usize,
    cfg: Option<f32>,
    sampling: &SamplingParams,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let mixed = cfg_mix_device(target.lm_head(feats)?, n_img, cfg)?;
    let rows: Vec<Vec<Vec<f32>>> = mixed.to_vec3()?;
    Ok(rows
        .into_iter()
        .map(|img| img.iter().map(|l| row_probs(sampling, l)).collect())
        .collect())
}

/// Gathers, for every batch row r, the entries `idx[r % n_img]` along dim 1 (one device
/// gather; every list has the same length).
fn gather_rows(x: &Tensor, idx: &[Vec<usize>], n_img: usize) -> Result<Tensor> {
    let (rows, _, d) = x.dims3()?;
    let m = idx.first().map_or(0, |v| v.len());
    if idx.len() != n_img || idx.iter().any(|v| v.len() != m) {
        return Err(Error::invalid(
            "gather",
            "one index list of equal length per image expected (internal error)",
        ));
    }
    let flat: Vec<u32> = (0..rows)
        .flat_map(|r| idx[r % n_img].iter().map(|&i| i as u32))
        .collect();
    let ix = Tensor::from_vec(flat, (rows, m, 1), x.device())?
        .broadcast_as((rows, m, d))?
        .contiguous()?;
    Ok(x.contiguous()?.gather(&ix, 1)?)
}

/// The drafter side of one tree: stable prefix in the drafter cache plus the nodes fed so far.
struct DraftSession<'a, T: Target, D: DraftModel> {
    target: &'a T,
    drafter: &'a D,
    cache: &'a mut D::Cache,
    n_img: usize,
    cfg: Option<f32>,
    sampling: SamplingParams,
    /// Drafter cache length of the accepted prefix.
    stable: usize,
    /// Drafter output after the root `[rows, 1, d]`, then every fed node.
    feats: Tensor,
    /// For every image and fed node: fed indices of its ancestors and itself.
    anc: Vec<Vec<Vec<usize>>>,
    levels: usize,
    forwards: usize,
}

impl<T: Target, D: DraftModel> Expand for DraftSession<'_, T, D> {
    fn expand(
        &mut self,
        tokens: &[Vec<u32>],
        parents: &[Vec<Option<usize>>],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let dev = self.feats.device().clone();
        let rows = self.feats.dim(0)?;
        let k = tokens.first().map_or(0, |t| t.len());
        let n_fed = self.anc.first().map_or(0, |a| a.len());
        let past = self.cache.len();
        if past != self.stable + n_fed {
            return Err(Error::invalid(
                "drafter cache",
                format!(
                    "length {past}, expected {} (internal error)",
                    self.stable + n_fed
                ),
            ));
        }
        let ids: Vec<u32> = (0..rows)
            .flat_map(|r| tokens[r % self.n_img].clone())
            .collect();
        let ids = Tensor::from_vec(ids, (rows, k), &dev)?;
        let src: Vec<Vec<usize>> = parents
            .iter()
            .map(|ps| ps.iter().map(|p| p.map_or(0, |i| i + 1)).collect())
            .collect();
        let feats = gather_rows(&self.feats, &src, self.n_img)?;
        let pos = vec![(self.stable + self.levels) as u32; k];
        let pos = Tensor::from_vec(pos, k, &dev)?;
        let width = past + k;
        let mut mask = vec![f32::NEG_INFINITY; self.n_img * k * width];
        let mut new_anc = vec![Vec::with_capacity(k); self.n_img];
        for (g, (ps, out)) in parents.iter().zip(new_anc.iter_mut()).enumerate() {
            for (i, p) in ps.iter().enumerate() {
                let mut a = p.map_or_else(Vec::new, |p| self.anc[g][p].clone());
                a.push(n_fed + i);
                out.push(a);
            }
        }
        for (g, anc) in new_anc.iter().enumerate() {
            for (i, a) in anc.iter().enumerate() {
                let row = &mut mask[(g * k + i) * width..(g * k + i + 1) * width];
                row[..self.stable].iter_mut().for_each(|x| *x = 0.0);
                for &j in a {
                    row[self.stable + j] = 0.0;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (self.n_img, k, width), &dev)?;
        let mask = mask.repeat((rows / self.n_img, 1, 1))?;
        let out =
            self.drafter
                .forward(&ids, &feats, &pos, &Visibility::Custom(mask), self.cache)?;
        self.forwards += 1;
        self.levels += 1;
        for (g, a) in new_anc.into_iter().enumerate() {
            self.anc[g].extend(a);
        }
        self.feats = Tensor::cat(&[&self.feats, &out], 1)?;
        drafter_probs(self.target, &out, self.n_img, self.cfg, &self.sampling)
    }
}

/// Verification layout: columns grouped by depth, shared by every image.
struct Layout {
    /// Column of every node of every image.
    cols: Vec<Vec<usize>>,
    /// Depth of every column.
    col_depth: Vec<usize>,
}

fn layout(trees: &[DraftTree]) -> Layout {
    let max_depth = trees.iter().map(|t| t.max_depth()).max().unwrap_or(0);
    let mut width = vec![0usize; max_depth + 1];
    for t in trees {
        let mut c = vec![0usize; max_depth + 1];
        for &d in &t.depths {
            c[d] += 1;
        }
        for d in 0..=max_depth {
            width[d] = width[d].max(c[d]);
        }
    }
    let mut offset = vec![0usize; max_depth + 1];
    for d in 1..=max_depth {
        offset[d] = offset[d - 1] + width[d - 1];
    }
    let col_depth = (0..=max_depth)
        .flat_map(|d| std::iter::repeat_n(d, width[d]))
        .collect();
    let cols = trees
        .iter()
        .map(|t| {
            let mut next = offset.clone();
            t.depths
                .iter()
                .map(|&d| {
                    next[d] += 1;
                    next[d] - 1
                })
                .collect()
        })
        .collect();
    Layout { cols, col_depth }
}

/// Runs speculative decoding (see the module docs).
pub fn generate_speculative<T: Target, D: DraftModel>(
    target: &T,
    drafter: &D,
    cond: &T::Condition,
    opts: &GenerateOptions,
    tree_spec: &TreeSpec,
    accept: &AcceptConfig,
    neighbors: Option<&Neighbors>,
) -> Result<Output> {
    tree_spec.validate()?;
    let n_img = target.num_images(cond);
    if n_img == 0 {
        return Err(Error::invalid("condition", "no images (give at least one)"));
    }
    let budget = token_budget(target, opts)?;
    let cfg = opts.uses_cfg().then_some(opts.cfg_scale);
    let rows = if cfg.is_some() { 2 * n_img } else { n_img };
    let cls = target.cond_len();
    let greedy = opts.sampling.is_greedy();
    let mut acc_cfg = *accept;
    acc_cfg.greedy = greedy;
    let (max_cols, max_fed) = match tree_spec {
        TreeSpec::Dynamic(p) => (
            n_img.min(p.depth + 2) * p.total_tokens,
            p.depth * p.top_k.min(target.vocab_size()),
        ),
        TreeSpec::Static(s) => (s.len(), s.len()),
    };
    let mut rngs: Vec<StdRng> = (0..n_img)
        .map(|g| StdRng::seed_from_u64(opts.seed.wrapping_add(g as u64)))
        .collect();
    let mut tcache = target.new_cache(rows, cls + budget + max_cols)?;
    let mut dcache = drafter.new_cache(rows, cls + budget + max_fed)?;
    let (mut t_draft, mut t_verify, mut t_accept) = (0.0f64, 0.0f64, 0.0f64);

    // prefill and first token
    let t = Instant::now();
    let hidden = target.prefill(cond, cfg.is_some(), &mut tcache)?;
    let logits = target.lm_head(&hidden.narrow(1, cls - 1, 1)?)?;
    t_verify += t.elapsed().as_secs_f64();
    let mut target_forwards = 1;
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(budget); n_img];
    for (g, toks) in tokens.iter_mut().enumerate() {
        let p = opts.sampling.probs(&cfg_row(&logits, g, n_img, 0, cfg)?);
        toks.push(sample_index(&p, &mut rngs[g]) as u32);
    }
    let dev: Device = hidden.device().clone();

    // first drafter feed: (feature j, token j+1) over the condition positions
    let t = Instant::now();
    let ids: Vec<u32> = (0..rows)
        .flat_map(|r| {
            let mut v = vec![0u32; cls];
            v[cls - 1] = tokens[r % n_img][0];
            v
        })
        .collect();
    let ids = Tensor::from_vec(ids, (rows, cls), &dev)?;
    let pos = Tensor::arange(0u32, cls as u32, &dev)?;
    let out = drafter.forward(&ids, &hidden, &pos, &Visibility::Causal, &mut dcache)?;
    let mut drafter_forwards = 1;
    let mut root_feat = out.narrow(1, cls - 1, 1)?;
    t_draft += t.elapsed().as_secs_f64();

    let mut steps: Vec<usize> = Vec::new();
    let mut tvds: Vec<Vec<f32>> = vec![Vec::new(); n_img];
    while tokens[0].len() < budget {
        let done = tokens[0].len();
        let root_pos = cls + done - 1;
        if tcache.len() != root_pos || dcache.len() != root_pos {
            return Err(Error::invalid(
                "cache",
                format!(
                    "target/drafter lengths {}/{} at position {root_pos} (internal error)",
                    tcache.len(),
                    dcache.len()
                ),
            ));
        }
        let roots: Vec<u32> = tokens.iter().map(|t| *t.last().unwrap_or(&0)).collect();

        // draft
        let t = Instant::now();
        let root_probs: Vec<Vec<f32>> =
            drafter_probs(target, &root_feat, n_img, cfg, &opts.sampling)?
                .into_iter()
                .map(|mut v| v.swap_remove(0))
                .collect();
        let mut session = DraftSession {
            target,
            drafter,
            cache: &mut dcache,
            n_img,
            cfg,
            sampling: opts.sampling,
            stable: root_pos,
            feats: root_feat.clone(),
            anc: vec![Vec::new(); n_img],
            levels: 0,
            forwards: 0,
        };
        let trees = match tree_spec {
            TreeSpec::Dynamic(p) => draft_dynamic(p, &roots, root_probs, &mut session)?,
            TreeSpec::Static(shape) => {
                let mut r: Vec<&mut dyn RngCore> =
                    rngs.iter_mut().map(|r| r as &mut dyn RngCore).collect();
                draft_static(shape, &roots, root_probs, greedy, &mut session, &mut r)?
            }
        };
        drafter_forwards += session.forwards;
        dcache.truncate(root_pos)?;
        t_draft += t.elapsed().as_secs_f64();

        // verify all trees in one forward
        let t = Instant::now();
        let lay = layout(&trees);
        let ncols = lay.col_depth.len();
        let mut ids = vec![0u32; n_img * ncols];
        let mut mask = vec![f32::NEG_INFINITY; n_img * ncols * (root_pos + ncols)];
        let width = root_pos + ncols;
        for (r, tr) in trees.iter().enumerate() {
            let cols = &lay.cols[r];
            for c in 0..ncols {
                ids[r * ncols + c] = roots[r];
                let row = &mut mask[(r * ncols + c) * width..(r * ncols + c + 1) * width];
                row[..root_pos].iter_mut().for_each(|x| *x = 0.0);
                row[root_pos + c] = 0.0;
            }
            for (i, &c) in cols.iter().enumerate() {
                ids[r * ncols + c] = tr.tokens[i];
                let row = &mut mask[(r * ncols + c) * width..(r * ncols + c + 1) * width];
                for a in tr.path_to(i) {
                    row[root_pos + cols[a]] = 0.0;
                }
            }
        }
        let halves = rows / n_img;
        let ids = Tensor::from_vec(ids, (n_img, ncols), &dev)?.repeat((halves, 1))?;
        let mask = Tensor::from_vec(mask, (n_img, ncols, width), &dev)?.repeat((halves, 1, 1))?;
        let pos: Vec<u32> = lay
            .col_depth
            .iter()
            .map(|&d| (root_pos + d) as u32)
            .collect();
        let pos = Tensor::from_vec(pos, ncols, &dev)?;
        let hidden = target.forward_tokens(&ids, &pos, &Visibility::Custom(mask), &mut tcache)?;
        let mixed = cfg_mix_device(target.lm_head(&hidden)?, n_img, cfg)?;
        target_forwards += 1;
        t_verify += t.elapsed().as_secs_f64();

        // accept
        let t = Instant::now();
        let mut decisions = Vec::with_capacity(n_img);
        for g in 0..n_img {
            let mut lazy = LazyRows {
                mixed: &mixed,
                g,
                cols: &lay.cols[g],
                sampling: &opts.sampling,
                memo: HashMap::new(),
            };
            decisions.push(accept_tree(
                &trees[g],
                &mut lazy,
                &acc_cfg,
                neighbors,
                &mut rngs[g],
            )?);
        }
        let m = decisions
            .iter()
            .map(|d| d.accepted.len() + 1)
            .min()
            .unwrap_or(1)
            .min(budget - done);
        let mut kept: Vec<Vec<usize>> = Vec::with_capacity(n_img);
        let mut emitted: Vec<Vec<u32>> = Vec::with_capacity(n_img);
        for (g, d) in decisions.iter().enumerate() {
            let mut k = vec![lay.cols[g][0]];
            k.extend(d.accepted[..m - 1].iter().map(|&n| lay.cols[g][n]));
            let mut seq: Vec<u32> = d.accepted.iter().map(|&n| trees[g].tokens[n]).collect();
            seq.push(d.next_token);
            seq.truncate(m);
            tvds[g].extend(d.tvd.iter().take(m));
            kept.push(k);
            emitted.push(seq);
        }
        let per_row: Vec<Vec<usize>> = (0..rows).map(|r| kept[r % n_img].clone()).collect();
        tcache.keep(root_pos, &per_row)?;
        for (toks, e) in tokens.iter_mut().zip(&emitted) {
            toks.extend_from_slice(e);
        }
        steps.push(m);
        t_accept += t.elapsed().as_secs_f64();
        if tokens[0].len() >= budget {
            break;
        }

        // feed the drafter the committed (feature, next token) pairs
        let t = Instant::now();
        let feats = gather_rows(&hidden, &kept, n_img)?;
        let ids: Vec<u32> = (0..rows).flat_map(|r| emitted[r % n_img].clone()).collect();
        let ids = Tensor::from_vec(ids, (rows, m), &dev)?;
        let pos = Tensor::arange(root_pos as u32, (root_pos + m) as u32, &dev)?;
        let out = drafter.forward(&ids, &feats, &pos, &Visibility::Causal, &mut dcache)?;
        drafter_forwards += 1;
        root_feat = out.narrow(1, m - 1, 1)?;
        t_draft += t.elapsed().as_secs_f64();
    }
    let stats = tvds
        .iter()
        .map(|tv| {
            let mut s = DecodeStats {
                target_forwards,
                drafter_forwards,
                accepted_per_step: steps.clone(),
                time_draft: t_draft,
                time_verify: t_verify,
                time_accept: t_accept,
                ..Default::default()
            };
            s.finish(tv);
            s
        })
        .collect();
    Ok(Output { tokens, stats })
}
