//! Drafting picks on the device: the drafter's probability rows are made where the logits are
//! ([`draft_probs`]) and only what a tree builder takes from a row comes back to the host: its
//! top-k ([`top_k`]) or k draws without replacement ([`draw`]), as `[n, k, 2]` f32 pairs
//! (token, probability; token `-1` where a row has no more picks).
//!
//! The CPU versions call the host functions ([`row_probs`], [`top_k_indices`],
//! [`draw_with_uniforms`]), so they are exact; the CUDA kernels (`kernels.cu`, section
//! "drafting picks") follow the same rules with another summation order.
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape};
use candle_core::{Tensor, D};

use crate::decode::draft::{draw_with_uniforms, top_k_indices};
use crate::decode::dynamic::{ln, select_columns, Cand};
use crate::sampling::{cfg_mix, row_probs, SamplingParams};

#[cfg(feature = "cuda")]
pub use super::picks_cuda::{set_cluster_picks, ClusterPicks};

/// Most picks per row [`top_k`] and [`draw`] serve.
pub const MAX_PICKS: usize = 64;

/// Whether [`draft_probs`] serves `sampling` on `dev`: always on the CPU; on CUDA every
/// setting but top-p < 1 (the nucleus needs a sort; callers compute those rows on the host).
pub fn probs_on_device(sampling: &SamplingParams, dev: &Device) -> bool {
    match dev {
        Device::Cpu => true,
        Device::Cuda(_) => sampling.is_greedy() || sampling.top_p >= 1.0,
        _ => false,
    }
}

/// The error for sampling filters [`probs_on_device`] does not serve on `dev`.
fn check_served(sampling: &SamplingParams, dev: &Device) -> Result<()> {
    if !probs_on_device(sampling, dev) {
        bail!(
            "draft_probs: top-p {} is not served on this device",
            sampling.top_p
        );
    }
    Ok(())
}

/// The logits as the probabilities kernels read them: contiguous, and f32 except on CUDA, whose
/// kernels read bf16 and f16 rows as they are (their f32 values are exact: the same
/// probabilities as after a cast, one kernel fewer).
fn logits_in(logits: &Tensor) -> Result<Tensor> {
    let keep = logits.device().is_cuda() && matches!(logits.dtype(), DType::BF16 | DType::F16);
    if keep {
        logits.contiguous()
    } else {
        logits.to_dtype(DType::F32)?.contiguous()
    }
}

/// Probabilities (f32) of every row of CFG-combined logits `[n, V]` as the speculative loop
/// uses them ([`row_probs`]: softmax when greedy, else temperature, top-k, top-p, softmax).
pub fn draft_probs(logits: &Tensor, sampling: &SamplingParams) -> Result<Tensor> {
    check_served(sampling, logits.device())?;
    let x = logits_in(logits)?;
    x.apply_op1_no_bwd(&Probs {
        sampling: *sampling,
    })
}

/// [`draft_probs`] of CFG-combined logits, combined in the same kernel: `logits` `[rows, s, V]`
/// holds `n_img` conditional images first and, with `cfg`, their unconditional halves
/// (`u + (c - u) * scale`, rounded after each operation like [`cfg_mix`] and the tensor ops)
/// → `[n_img * s, V]`.
pub fn draft_probs_cfg(
    logits: &Tensor,
    n_img: usize,
    cfg: Option<f32>,
    sampling: &SamplingParams,
) -> Result<Tensor> {
    let (rows, s, v) = logits.dims3()?;
    let Some(scale) = cfg else {
        return draft_probs(&logits.reshape((rows * s, v))?, sampling);
    };
    if rows != 2 * n_img {
        bail!("draft_probs_cfg: {rows} rows for {n_img} images with CFG");
    }
    check_served(sampling, logits.device())?;
    let x = logits_in(logits)?;
    let half = |i: usize| x.narrow(0, i * n_img, n_img)?.reshape((n_img * s, v));
    half(0)?.apply_op2_no_bwd(
        &half(1)?,
        &ProbsCfg {
            sampling: *sampling,
            scale,
        },
    )
}

/// Top `k` of every row of `probs` `[n, V]` (ties: lower index first) → `[n, k, 2]`.
pub fn top_k(probs: &Tensor, k: usize) -> Result<Tensor> {
    check_k(k)?;
    probs
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&TopK { k })
}

/// Draws without replacement from every row of `probs` `[n, V]` with the uniforms `[n, k]`
/// (f64 in `[0, 1)`; a negative uniform ends the row's draws) → `[n, k, 2]` (token, conditional
/// probability), as [`draw_with_uniforms`] of the row's uniforms up to the first negative.
pub fn draw(probs: &Tensor, uniforms: &Tensor) -> Result<Tensor> {
    check_k(uniforms.dim(D::Minus1)?)?;
    probs
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2_no_bwd(&uniforms.to_dtype(DType::F64)?.contiguous()?, &Draw)
}

fn check_k(k: usize) -> Result<()> {
    if !(1..=MAX_PICKS).contains(&k) {
        bail!("drafting picks: {k} per row (1 to {MAX_PICKS} are served)");
    }
    Ok(())
}

/// `[n, V]` of a contiguous layout.
fn rows_of(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, v] if l.is_contiguous() && *v > 0 => Ok((*n, *v)),
        d => bail!("drafting picks: a contiguous [n, V] input expected, got {d:?}"),
    }
}

fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    super::cpu::contiguous(s.as_slice::<T>()?, l)
}

/// Writes `picks` into the `k` pairs of one output row, `-1` past the end.
fn put_pairs(out: &mut [f32], picks: impl Iterator<Item = (usize, f32)>) {
    out.iter_mut().for_each(|x| *x = 0.0);
    out.chunks_exact_mut(2).for_each(|p| p[0] = -1.0);
    for (pair, (i, v)) in out.chunks_exact_mut(2).zip(picks) {
        pair[0] = i as f32;
        pair[1] = v;
    }
}

/// Built only by [`draft_probs`], which checks that the device serves `sampling`.
struct Probs {
    sampling: SamplingParams,
}

impl CustomOp1 for Probs {
    fn name(&self) -> &'static str {
        "lantern-draft-probs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, v) = rows_of(l)?;
        let x = cpu_slice::<f32>(s, l)?;
        let mut out = Vec::with_capacity(x.len());
        for r in x.chunks_exact(v) {
            out.extend(row_probs(&self.sampling, r));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = rows_of(l)?;
        super::picks_cuda::probs(&self.sampling, s, l, n, v, None).map(|st| (st, l.shape().clone()))
    }
}

/// `[n, V]` of both halves of a CFG batch (conditional rows, unconditional rows).
fn halves(cl: &Layout, ul: &Layout) -> Result<(usize, usize)> {
    let (c, u) = (rows_of(cl)?, rows_of(ul)?);
    if c != u {
        bail!(
            "draft_probs_cfg: halves {:?} and {:?}",
            cl.dims(),
            ul.dims()
        );
    }
    Ok(c)
}

/// Built only by [`draft_probs_cfg`]: conditional rows, then the unconditional rows as the
/// second input.
struct ProbsCfg {
    sampling: SamplingParams,
    scale: f32,
}

impl CustomOp2 for ProbsCfg {
    fn name(&self) -> &'static str {
        "lantern-draft-probs-cfg"
    }

    fn cpu_fwd(
        &self,
        c: &CpuStorage,
        cl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = halves(cl, ul)?;
        let (c, u) = (cpu_slice::<f32>(c, cl)?, cpu_slice::<f32>(u, ul)?);
        let mut out = Vec::with_capacity(c.len());
        for (cr, ur) in c.chunks_exact(v).zip(u.chunks_exact(v)) {
            // the host's mix: sub, scale, add, each rounded to f32 like the tensor ops
            out.extend(row_probs(&self.sampling, &cfg_mix(cr, ur, self.scale)));
        }
        Ok((CpuStorage::F32(out), cl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = halves(cl, ul)?;
        super::picks_cuda::probs(&self.sampling, c, cl, n, v, Some((u, ul, self.scale)))
            .map(|st| (st, cl.shape().clone()))
    }
}

pub(super) struct TopK {
    pub(super) k: usize,
}

impl CustomOp1 for TopK {
    fn name(&self) -> &'static str {
        "lantern-draft-top-k"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = rows_of(l)?;
        let x = cpu_slice::<f32>(s, l)?;
        let mut out = vec![0f32; n * self.k * 2];
        for (row, o) in x.chunks_exact(v).zip(out.chunks_exact_mut(self.k * 2)) {
            put_pairs(
                o,
                top_k_indices(row, self.k).into_iter().map(|i| (i, row[i])),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((n, self.k, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = rows_of(l)?;
        super::picks_cuda::top_k(s, l, n, v, self.k).map(|st| (st, Shape::from((n, self.k, 2))))
    }
}

pub(super) struct Draw;

/// Rows and picks per row of a draw: probabilities `[n, V]`, uniforms `[n, k]`.
fn draw_dims(pl: &Layout, ul: &Layout) -> Result<(usize, usize, usize)> {
    let (n, v) = rows_of(pl)?;
    match ul.dims() {
        [un, k] if *un == n && ul.is_contiguous() => Ok((n, v, *k)),
        d => bail!("drafting picks: uniforms [{n}, k] expected, got {d:?}"),
    }
}

impl CustomOp2 for Draw {
    fn name(&self) -> &'static str {
        "lantern-draft-draw"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v, k) = draw_dims(l, ul)?;
        let x = cpu_slice::<f32>(s, l)?;
        let u = cpu_slice::<f64>(us, ul)?;
        let mut out = vec![0f32; n * k * 2];
        for ((row, u), o) in x
            .chunks_exact(v)
            .zip(u.chunks_exact(k))
            .zip(out.chunks_exact_mut(k * 2))
        {
            let m = u.iter().position(|&x| x < 0.0).unwrap_or(k);
            put_pairs(o, draw_with_uniforms(row, &u[..m]).into_iter());
        }
        Ok((CpuStorage::F32(out), Shape::from((n, k, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, v, k) = draw_dims(l, ul)?;
        super::picks_cuda::draw(s, l, us, ul, n, v, k).map(|st| (st, Shape::from((n, k, 2))))
    }
}

/// The tokens at flat indices `at` (u32 `[m]`) of picks (f32, any shape; a pick's token, or
/// `-1` where there is none, read as token 0), `reps` times over → u32 `[reps * m]`: one kernel
/// where gather, clamp, cast and repeat were four (the drafting graph's level inputs).
pub fn pick_tokens(picks: &Tensor, at: &Tensor, reps: usize) -> Result<Tensor> {
    if reps == 0 || at.rank() != 1 {
        bail!(
            "pick_tokens: indices [m] and reps >= 1 expected, got {:?} x {reps}",
            at.dims()
        );
    }
    picks
        .flatten_all()?
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2_no_bwd(
            &at.to_dtype(DType::U32)?.contiguous()?,
            &PickTokens { reps },
        )
}

/// See [`pick_tokens`].
struct PickTokens {
    reps: usize,
}

impl CustomOp2 for PickTokens {
    fn name(&self) -> &'static str {
        "lantern-pick-tokens"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = cpu_slice::<f32>(s, l)?;
        let at = cpu_slice::<u32>(a, al)?;
        let once = at
            .iter()
            .map(|&i| match p.get(i as usize) {
                Some(&x) => Ok(x.max(0.0) as u32),
                None => bail!("pick_tokens: index {i} past {} picks", p.len()),
            })
            .collect::<Result<Vec<u32>>>()?;
        let n = once.len() * self.reps;
        Ok((CpuStorage::U32(once.repeat(self.reps)), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let m = al.shape().elem_count();
        super::picks_cuda::pick_tokens(s, l, a, al, m, self.reps)
            .map(|st| (st, Shape::from(m * self.reps)))
    }
}

/// Where the sections of [`frontier`]'s output lie (u32 words, image-major within each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontierLayout {
    /// Images.
    pub n_img: usize,
    /// Picked rows per image (the fed nodes the level follows; 1 for the root level).
    pub rows_per_img: usize,
    /// Picks per row.
    pub k: usize,
    /// Candidates kept per image (the next frontier).
    pub keep: usize,
    /// Rows of the drafter's batch (`n_img`, or `2 n_img` with CFG; row r is image r % n_img).
    pub rows: usize,
}

impl FrontierLayout {
    /// Candidates per image (`rows_per_img * k`, in creation order: row i's pick j is i k + j).
    pub fn cands(&self) -> usize {
        self.rows_per_img * self.k
    }
    /// `[n_img, cands]` f32 bits: every candidate's score (its parent's score + ln p).
    pub fn scores(&self) -> usize {
        0
    }
    /// `[n_img, keep]`: the kept candidates, ascending (creation order).
    pub fn chosen(&self) -> usize {
        self.n_img * self.cands()
    }
    /// `[n_img, keep]` f32 bits: their scores (the next level's parent scores).
    pub fn chosen_scores(&self) -> usize {
        self.chosen() + self.n_img * self.keep
    }
    /// `[rows, keep]`: their tokens, for every row of the drafter's batch.
    pub fn tokens(&self) -> usize {
        self.chosen_scores() + self.n_img * self.keep
    }
    /// `[rows * keep]`: `row * stride + slot` of each kept candidate's parent.
    pub fn gather(&self) -> usize {
        self.tokens() + self.rows * self.keep
    }
    /// `[n_img, cands]`: every candidate's token (0 for a pick without one).
    pub fn cand_tokens(&self) -> usize {
        self.gather() + self.rows * self.keep
    }
    /// Words in all.
    pub fn len(&self) -> usize {
        self.cand_tokens() + self.n_img * self.cands()
    }
    /// Whether there is nothing (never for a valid layout).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One level of EAGLE-2's dynamic tree on the device ([`crate::decode::dynamic`]): from the
/// level's top-k `picks` `[n_img * rows_per_img, k, 2]` and the parents' scores `base`
/// (`[n_img, rows_per_img]` u32 holding f32 bits), every candidate's score `base + ln p`, the
/// `keep` best per image (larger score first, ties: earlier candidate first) in creation order,
/// their tokens for every drafter row, and where their parents' features are: `row * stride +
/// slot`, slot 0 (the root) for the root level (`slot_base` `None`), else `1 + slot_base + i`
/// for a parent that is fed node i of the level, and every candidate's token (so that the host
/// reads a level from this output alone). Output: u32 `[layout.len()]` ([`FrontierLayout`]). A
/// pick without a token scores `-inf`.
pub fn frontier(
    picks: &Tensor,
    base: &Tensor,
    layout: FrontierLayout,
    stride: usize,
    slot_base: Option<usize>,
) -> Result<Tensor> {
    let l = layout;
    if picks.dims() != [l.n_img * l.rows_per_img, l.k, 2]
        || base.dims() != [l.n_img, l.rows_per_img]
        || l.keep == 0
        || l.keep > l.cands()
        || l.cands() > MAX_PICKS * MAX_PICKS
        || l.n_img == 0
        || !l.rows.is_multiple_of(l.n_img)
    {
        bail!(
            "frontier: picks {:?} and parent scores {:?} do not fit {l:?}",
            picks.dims(),
            base.dims()
        );
    }
    picks.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(
        &base.to_dtype(DType::U32)?.contiguous()?,
        &Frontier {
            layout: l,
            stride,
            slot_base,
        },
    )
}

/// See [`frontier`].
struct Frontier {
    layout: FrontierLayout,
    stride: usize,
    slot_base: Option<usize>,
}

impl CustomOp2 for Frontier {
    fn name(&self) -> &'static str {
        "lantern-frontier"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let lay = self.layout;
        let picks = cpu_slice::<f32>(s, l)?;
        let base = cpu_slice::<u32>(b, bl)?;
        let (nc, k, keep) = (lay.cands(), lay.k, lay.keep);
        let mut out = vec![0u32; lay.len()];
        for g in 0..lay.n_img {
            // candidate c of image g: pick c % k of its row c / k, i.e. pair g nc + c
            let pair = |c: usize| &picks[(g * nc + c) * 2..(g * nc + c) * 2 + 2];
            let token = |c: usize| pair(c)[0].max(0.0) as u32;
            // the host path's arithmetic (dynamic.rs): parent score + ln p
            let scores: Vec<f32> = (0..nc)
                .map(|c| {
                    let p = pair(c);
                    let ln = if p[0] >= 0.0 {
                        ln(p[1])
                    } else {
                        f32::NEG_INFINITY
                    };
                    f32::from_bits(base[g * lay.rows_per_img + c / k]) + ln
                })
                .collect();
            for (c, x) in scores.iter().enumerate() {
                out[lay.scores() + g * nc + c] = x.to_bits();
                out[lay.cand_tokens() + g * nc + c] = token(c);
            }
            let mut kept = top_k_indices(&scores, keep);
            kept.sort_unstable();
            for (q, &c) in kept.iter().enumerate() {
                out[lay.chosen() + g * keep + q] = c as u32;
                out[lay.chosen_scores() + g * keep + q] = scores[c].to_bits();
                let slot = self.slot_base.map_or(0, |b| 1 + b + c / k);
                for r in (g..lay.rows).step_by(lay.n_img) {
                    out[lay.tokens() + r * keep + q] = token(c);
                    out[lay.gather() + r * keep + q] = (r * self.stride + slot) as u32;
                }
            }
        }
        Ok((CpuStorage::U32(out), Shape::from(lay.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let lay = self.layout;
        super::picks_cuda::frontier(s, l, b, bl, &lay, self.stride, self.slot_base)
            .map(|st| (st, Shape::from(lay.len())))
    }
}

/// The sizes of a dynamic tree's drafting computation ([`crate::decode::dynamic_graph`]): the
/// [`frontier`] outputs of its `depth + 1` levels lie one after another in one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicLevels {
    /// Images.
    pub n_img: usize,
    /// Picks per row and frontier width.
    pub k: usize,
    /// Expansions (levels after the root's).
    pub depth: usize,
    /// Rows of the drafter's batch.
    pub rows: usize,
    /// Verified tokens per tree, root included (as asked; see [`DynamicLevels::cols`]).
    pub total: usize,
}

/// Most candidates per image [`select_tree`] serves (its kernel keeps them in shared memory).
pub const MAX_SELECT_CANDS: usize = 4096;

impl DynamicLevels {
    /// Level `l`'s frontier layout (level 0 follows the root: one row per image).
    pub fn layout(&self, l: usize) -> FrontierLayout {
        FrontierLayout {
            n_img: self.n_img,
            rows_per_img: if l == 0 { 1 } else { self.k },
            k: self.k,
            keep: self.k,
            rows: self.rows,
        }
    }

    /// Start of level `l`'s frontier output.
    pub fn level_at(&self, l: usize) -> usize {
        (0..l).map(|i| self.layout(i).len()).sum()
    }

    /// Words of every level's output.
    pub fn len(&self) -> usize {
        self.level_at(self.depth + 1)
    }

    /// Whether there is nothing (never for a valid setting).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Candidates per image, in creation order: the root's `k`, then `k * k` per expansion.
    pub fn cands(&self) -> usize {
        self.k + self.depth * self.k * self.k
    }

    /// Columns of every image's verification tree: `total`, or every candidate after the root
    /// where there are fewer.
    pub fn cols(&self) -> usize {
        self.total.min(self.cands() + 1)
    }

    /// The level of candidate `c` (its depth in the tree minus one).
    pub fn level_of(&self, c: usize) -> usize {
        if c < self.k {
            0
        } else {
            1 + (c - self.k) / (self.k * self.k)
        }
    }

    /// Image `g`'s candidates from every level's output `fronts` (tokens, scores as the
    /// device computed them, parents by candidate index), as the host path makes them.
    pub(crate) fn candidates(&self, fronts: &[u32], g: usize) -> Vec<Cand> {
        let k = self.k;
        let mut cands: Vec<Cand> = Vec::with_capacity(self.cands());
        // candidate index of each frontier node (the root level: none)
        let mut frontier: Vec<Option<usize>> = vec![None];
        for l in 0..=self.depth {
            let (lay, at) = (self.layout(l), self.level_at(l));
            let (nc, start) = (lay.cands(), cands.len());
            let front = &fronts[at..at + lay.len()];
            for c in 0..nc {
                cands.push(Cand {
                    token: front[lay.cand_tokens() + g * nc + c],
                    score: f32::from_bits(front[lay.scores() + g * nc + c]),
                    parent: frontier[c / k],
                });
            }
            frontier = front[lay.chosen() + g * k..lay.chosen() + (g + 1) * k]
                .iter()
                .map(|&c| Some(start + c as usize))
                .collect();
        }
        cands
    }
}

/// Every image's verification tree of EAGLE-2's dynamic drafting on the device, from every
/// level's [`frontier`] output `fronts` (u32 `[levels.len()]`) and `roots` (u32 `[n_img, 2]`:
/// each image's root token and position): the `cols - 1` best candidates in creation order
/// ([`crate::decode::dynamic::select_columns`], the host path's choice). Output f32
/// `[n_img, 3 + cols, cols]`, per image: the columns' tokens, positions (root's + depth) and parent
/// columns (`-1` where a parent was not selected), then the additive tree mask `[cols, cols]`
/// (0 on a column's ancestors and itself). Integers are exact in f32 (below 2^24).
pub fn select_tree(fronts: &Tensor, roots: &Tensor, levels: DynamicLevels) -> Result<Tensor> {
    let lv = levels;
    if fronts.dims() != [lv.len()]
        || roots.dims() != [lv.n_img, 2]
        || lv.k == 0
        || lv.k > MAX_PICKS
        || lv.cands() > MAX_SELECT_CANDS
        || lv.total < 2
        || lv.n_img == 0
    {
        bail!(
            "select tree: fronts {:?} and roots {:?} do not fit {lv:?}",
            fronts.dims(),
            roots.dims()
        );
    }
    fronts
        .to_dtype(DType::U32)?
        .contiguous()?
        .apply_op2_no_bwd(&roots.to_dtype(DType::U32)?.contiguous()?, &SelectTree(lv))
}

/// See [`select_tree`].
struct SelectTree(DynamicLevels);

impl CustomOp2 for SelectTree {
    fn name(&self) -> &'static str {
        "lantern-select-tree"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let lv = self.0;
        let fronts = cpu_slice::<u32>(s, l)?;
        let roots = cpu_slice::<u32>(r, rl)?;
        let n = lv.cols();
        let mut out = vec![0f32; lv.n_img * (3 + n) * n];
        for (g, o) in out.chunks_exact_mut((3 + n) * n).enumerate() {
            let cands = lv.candidates(fronts, g);
            let (order, parents) = select_columns(&cands, n);
            let (root, at) = (roots[2 * g], roots[2 * g + 1]);
            o[0] = root as f32;
            o[n] = at as f32;
            for (i, &ci) in order.iter().enumerate() {
                o[1 + i] = cands[ci].token as f32;
                o[n + 1 + i] = (at as usize + lv.level_of(ci) + 1) as f32;
            }
            for (i, p) in parents.iter().enumerate() {
                o[2 * n + i] = p.map_or(-1.0, |p| p as f32);
            }
            let mask = &mut o[3 * n..];
            mask.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
            for i in 0..n {
                // the column, then its ancestors up to the root (or a missing parent)
                let mut a = Some(i);
                while let Some(x) = a {
                    mask[i * n + x] = 0.0;
                    a = if x == 0 { None } else { parents[x] };
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((lv.n_img, 3 + n, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let lv = self.0;
        let n = lv.cols();
        super::picks_cuda::select_tree(s, l, r, rl, &lv)
            .map(|st| (st, Shape::from((lv.n_img, 3 + n, n))))
    }
}

/// The `[n, k, 2]` output of [`top_k`] or [`draw`] on the host: per row, its picks as
/// (token, probability), up to the first `-1`.
pub fn picks_to_host(picks: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
    let (n, k, two) = picks.dims3()?;
    if two != 2 {
        bail!("drafting picks: [n, k, 2] expected, got {:?}", picks.dims());
    }
    let flat: Vec<f32> = picks.flatten_all()?.to_vec1()?;
    Ok((0..n)
        .map(|r| {
            flat[r * k * 2..(r + 1) * k * 2]
                .chunks_exact(2)
                .take_while(|p| p[0] >= 0.0)
                .map(|p| (p[0] as usize, p[1]))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::draft::draw_without_replacement;
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    /// Random rows with many ties, zero entries and one all-zero row.
    fn rows(rng: &mut StdRng, n: usize, v: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|r| {
                (0..v)
                    .map(|_| {
                        if r == 0 {
                            0.0
                        } else if r % 3 == 1 {
                            rng.random_range(0..4) as f32 / 8.0
                        } else {
                            rng.random::<f32>() * rng.random_range(0..2) as f32
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn tensor(rows: &[Vec<f32>]) -> Tensor {
        let v = rows[0].len();
        Tensor::from_vec(rows.concat(), (rows.len(), v), &Device::Cpu).unwrap()
    }

    #[test]
    fn top_k_op_equals_host_top_k_with_probabilities() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(11);
        for (v, k) in [(1, 1), (5, 3), (5, 8), (300, 10), (1024, 64)] {
            let r = rows(&mut rng, 7, v);
            let got = picks_to_host(&top_k(&tensor(&r), k)?)?;
            for (row, g) in r.iter().zip(&got) {
                let want: Vec<(usize, f32)> = top_k_indices(row, k)
                    .into_iter()
                    .map(|i| (i, row[i]))
                    .collect();
                assert_eq!(*g, want, "v {v} k {k}");
            }
        }
        assert!(top_k(&tensor(&[vec![1.0]]), 0).is_err());
        Ok(())
    }

    #[test]
    fn draw_op_equals_draws_without_replacement_from_the_same_stream() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(12);
        for (v, k) in [(1, 1), (4, 4), (6, 10), (500, 9)] {
            let r = rows(&mut rng, 9, v);
            // the stream consumed as the host function consumes it: k uniforms per row
            let mut host = StdRng::seed_from_u64(v as u64);
            let mut dev = host.clone();
            let mut us: Vec<f64> = (0..r.len() * k).map(|_| dev.random::<f64>()).collect();
            // a negative uniform ends a row's draws
            us[k * 2..k * 3].iter_mut().skip(1).for_each(|u| *u = -1.0);
            let ut = Tensor::from_vec(us, (r.len(), k), &Device::Cpu)?;
            let got = picks_to_host(&draw(&tensor(&r), &ut)?)?;
            for (i, (row, g)) in r.iter().zip(&got).enumerate() {
                let want = draw_without_replacement(row, k, &mut host as &mut dyn RngCore);
                if i == 2 {
                    assert_eq!(*g, want[..want.len().min(1)], "v {v} k {k}: cut at -1");
                } else {
                    assert_eq!(*g, want, "v {v} k {k}");
                }
            }
            assert_eq!(got[0], vec![], "an all-zero row draws nothing");
            assert_eq!(host.next_u64(), dev.next_u64(), "streams in step");
        }
        Ok(())
    }

    /// `n` rows of 40 logits uniform in [-4, 4).
    fn logit_rows(seed: u64, n: usize) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..40).map(|_| rng.random_range(-4.0..4.0f32)).collect())
            .collect()
    }

    #[test]
    fn probs_op_equals_host_rows() -> Result<()> {
        let logits = logit_rows(13, 5);
        for s in [
            SamplingParams::greedy(),
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.7,
                top_k: 5,
                top_p: 0.8,
            },
        ] {
            let p: Vec<f32> = draft_probs(&tensor(&logits), &s)?
                .flatten_all()?
                .to_vec1()?;
            let want: Vec<f32> = logits.iter().flat_map(|l| row_probs(&s, l)).collect();
            assert_eq!(p, want, "{s:?}");
        }
        Ok(())
    }

    #[test]
    fn cfg_probs_op_equals_probs_of_the_mixed_logits() -> Result<()> {
        // 2 images x 3 rows, conditional halves first
        let logits = tensor(&logit_rows(15, 12)).reshape((4, 3, 40))?;
        for s in [SamplingParams::greedy(), SamplingParams::default()] {
            let got: Vec<f32> = draft_probs_cfg(&logits, 2, Some(2.5), &s)?
                .flatten_all()?
                .to_vec1()?;
            let (c, u) = (logits.narrow(0, 0, 2)?, logits.narrow(0, 2, 2)?);
            let mixed = (&u + ((&c - &u)? * 2.5)?)?.reshape((6, 40))?;
            let want: Vec<f32> = draft_probs(&mixed, &s)?.flatten_all()?.to_vec1()?;
            assert_eq!(got, want, "{s:?}");
            let plain: Vec<f32> = draft_probs_cfg(&c, 2, None, &s)?.flatten_all()?.to_vec1()?;
            let want: Vec<f32> = draft_probs(&c.reshape((6, 40))?, &s)?
                .flatten_all()?
                .to_vec1()?;
            assert_eq!(plain, want);
        }
        assert!(draft_probs_cfg(&logits, 3, Some(2.0), &SamplingParams::default()).is_err());
        Ok(())
    }

    #[test]
    fn pick_tokens_equals_gather_clamp_cast_repeat() -> Result<()> {
        let p = Tensor::new(&[[3f32, 7.0], [-1.0, 12.0], [0.0, -1.0]], &Device::Cpu)?;
        let at = Tensor::new(&[1u32, 2, 3, 5, 0], &Device::Cpu)?;
        let want = p
            .flatten_all()?
            .index_select(&at, 0)?
            .maximum(0f32)?
            .to_dtype(DType::U32)?
            .reshape((1, 5))?
            .repeat((3, 1))?
            .flatten_all()?;
        let got = pick_tokens(&p, &at, 3)?;
        assert_eq!(got.to_vec1::<u32>()?, want.to_vec1::<u32>()?);
        assert_eq!(got.to_vec1::<u32>()?[..5], [7, 0, 12, 0, 3]);
        assert!(pick_tokens(&p, &Tensor::new(&[6u32], &Device::Cpu)?, 1).is_err());
        assert!(pick_tokens(&p, &at, 0).is_err());
        Ok(())
    }

    /// Frontier picks of `rows(..)` (ties, zero probabilities) under parent scores `base`.
    #[cfg(feature = "cuda")]
    fn frontier_case(
        rng: &mut StdRng,
        lay: FrontierLayout,
        v: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let r = rows(rng, lay.n_img * lay.rows_per_img, v);
        let picks = top_k(&tensor(&r), lay.k)?.to_device(dev)?;
        let base: Vec<u32> = (0..lay.n_img * lay.rows_per_img)
            .map(|i| (-((i % 3) as f32) * 0.5).to_bits())
            .collect();
        let base = Tensor::from_vec(base, (lay.n_img, lay.rows_per_img), dev)?;
        Ok((picks, base))
    }

    #[test]
    fn frontier_op_keeps_the_best_in_creation_order() -> Result<()> {
        // 2 images, 2 fed rows each, 2 picks per row, keep 2, CFG (4 drafter rows)
        let lay = FrontierLayout {
            n_img: 2,
            rows_per_img: 2,
            k: 2,
            keep: 2,
            rows: 4,
        };
        let picks = Tensor::from_vec(
            vec![
                5f32, 0.5, 6., 0.5, // image 0, row 0
                7., 0.9, 8., 0.1, // image 0, row 1
                1., 0.6, 2., 0.4, // image 1, row 0
                3., 0.6, 4., 0.0, // image 1, row 1
            ],
            (4, 2, 2),
            &Device::Cpu,
        )?;
        let base = Tensor::from_vec(
            [-1f32, -0.1, 0.0, 0.0].map(f32::to_bits).to_vec(),
            (2, 2),
            &Device::Cpu,
        )?;
        let out = frontier(&picks, &base, lay, 7, Some(3))?.to_vec1::<u32>()?;
        assert_eq!(out.len(), lay.len());
        let f = |i: usize| f32::from_bits(out[i]);
        assert_eq!(f(lay.scores() + 2), -0.1 + 0.9f32.ln());
        assert_eq!(f(lay.scores() + 7), f32::NEG_INFINITY);
        // image 0: scores -1.69, -1.69, -0.21, -2.40 -> candidates 2 and 0 (tie: earlier)
        // image 1: -0.51, -0.92, -0.51, -inf -> 0 and 2 (equal scores)
        assert_eq!(out[lay.chosen()..lay.chosen() + 4], [0, 2, 0, 2]);
        assert_eq!(f(lay.chosen_scores() + 1), -0.1 + 0.9f32.ln());
        assert_eq!(
            out[lay.tokens()..lay.tokens() + 8],
            [5, 7, 1, 3, 5, 7, 1, 3]
        );
        // parents: fed rows 0 and 1 of the level at slots 1 + 3 + row, drafter row r * 7
        assert_eq!(
            out[lay.gather()..lay.cand_tokens()],
            [4, 5, 11, 12, 18, 19, 25, 26]
        );
        assert_eq!(out[lay.cand_tokens()..], [5, 6, 7, 8, 1, 2, 3, 4]);
        let root = frontier(
            &picks.narrow(0, 0, 2)?,
            &Tensor::zeros((2, 1), DType::U32, &Device::Cpu)?,
            FrontierLayout {
                rows_per_img: 1,
                ..lay
            },
            7,
            None,
        )?
        .to_vec1::<u32>()?;
        // the root level keeps every pick, its parents all at slot 0
        let at = root.len() - 2 * 2 - 8;
        assert_eq!(root[at..at + 8], [0, 0, 7, 7, 14, 14, 21, 21]);
        assert!(frontier(&picks, &base, FrontierLayout { keep: 5, ..lay }, 7, None).is_err());
        Ok(())
    }

    /// The frontier kernel against the CPU version: random picks with ties and zero
    /// probabilities, the root level and wide levels (64 x 64 candidates).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_frontier_matches_cpu() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let mut rng = StdRng::seed_from_u64(21);
        for (n_img, rpi, k, keep, reps, v) in [
            (1, 1, 10, 10, 2, 300),
            (3, 10, 10, 10, 2, 300),
            (2, 4, 8, 5, 1, 50),
            (2, 64, 64, 64, 2, 1024),
        ] {
            let lay = FrontierLayout {
                n_img,
                rows_per_img: rpi,
                k,
                keep,
                rows: reps * n_img,
            };
            let (picks, base) = frontier_case(&mut rng, lay, v, &Device::Cpu)?;
            let slot = (rpi > 1).then_some(3 * k);
            let a = frontier(&picks, &base, lay, 1 + 4 * k, slot)?.to_vec1::<u32>()?;
            let b = frontier(
                &picks.to_device(&gpu)?,
                &base.to_device(&gpu)?,
                lay,
                1 + 4 * k,
                slot,
            )?
            .to_vec1::<u32>()?;
            // scores (also the kept ones') to ln's rounding (logf vs the host's ln); the
            // choice, tokens and parents exactly
            let (at, kept) = (lay.chosen(), lay.chosen_scores()..lay.tokens());
            for i in (0..at).chain(kept.clone()) {
                let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
                assert!(
                    x == y || (x - y).abs() <= 1e-6 * x.abs(),
                    "{lay:?} score {i}: {x} vs {y}"
                );
            }
            let b: Vec<u32> = b
                .iter()
                .enumerate()
                .map(|(i, &y)| if kept.contains(&i) { a[i] } else { y })
                .collect();
            if let Some(i) = (at..a.len()).find(|&i| a[i] != b[i]) {
                let sec = [
                    ("chosen", lay.chosen()),
                    ("chosen scores", lay.chosen_scores()),
                    ("tokens", lay.tokens()),
                    ("gather", lay.gather()),
                ]
                .into_iter()
                .rfind(|s| s.1 <= i)
                .unwrap_or(("?", 0));
                let g = (i - sec.1) / keep.max(1);
                let (c0, c1) = (lay.chosen() + g * keep, lay.chosen() + (g + 1) * keep);
                panic!(
                    "{lay:?}: {} word {} differs: cpu {} gpu {}; chosen of image {g}: cpu {:?} \
                     gpu {:?}",
                    sec.0,
                    i - sec.1,
                    a[i],
                    b[i],
                    a.get(c0..c1),
                    b.get(c0..c1)
                );
            }
        }
        Ok(())
    }

    /// The CUDA kernels against the CPU versions (top-k exactly; probabilities and draws up to
    /// summation order), with one block per row and with a cluster per row (Hopper builds;
    /// every row, so rows of 5 leave blocks of the cluster empty); 20,000 is past the rows the
    /// kernels keep in registers. The last row has two positive codes, so its draws run out of
    /// mass.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_picks_agree_with_cpu() -> Result<()> {
        for mode in [ClusterPicks::Off, ClusterPicks::AllRows] {
            set_cluster_picks(mode);
            picks_agree(mode)?;
        }
        set_cluster_picks(ClusterPicks::LongRows);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn picks_agree(cluster: ClusterPicks) -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let mut rng = StdRng::seed_from_u64(14);
        for v in [5usize, 1024, 16384, 20000] {
            let mut r = rows(&mut rng, 12, v);
            r.push((0..v).map(|i| (i % 7) as f32).collect());
            r.push((0..v).map(|i| f32::from(i == 1 || i == v - 2)).collect());
            let cpu = tensor(&r);
            let dev = cpu.to_device(&gpu)?;
            for k in [1, 10, 64] {
                let a = picks_to_host(&top_k(&cpu, k)?)?;
                let b = picks_to_host(&top_k(&dev, k)?)?;
                assert_eq!(a, b, "top-k v {v} k {k} cluster {cluster:?}");
            }
            for s in [
                SamplingParams::greedy(),
                SamplingParams::default(),
                SamplingParams {
                    temperature: 0.7,
                    top_k: 3.min(v),
                    top_p: 1.0,
                },
                SamplingParams {
                    temperature: 1.3,
                    top_k: 100,
                    top_p: 1.0,
                },
            ] {
                // not the last row: its 16,382 equal codes make the host's sequential f32 sum
                // drift past the tolerance
                let logits = (cpu.narrow(0, 0, 13)? * 9.0)?;
                // plain rows, then as CFG halves (6 images, conditional halves first)
                let cfg = logits.narrow(0, 0, 12)?.reshape((12, 1, v))?;
                let a: Vec<f32> = draft_probs(&logits, &s)?.flatten_all()?.to_vec1()?;
                let b: Vec<f32> = draft_probs(&logits.to_device(&gpu)?, &s)?
                    .flatten_all()?
                    .to_vec1()?;
                let c: Vec<f32> = draft_probs_cfg(&cfg, 6, Some(2.5), &s)?
                    .flatten_all()?
                    .to_vec1()?;
                let d: Vec<f32> = draft_probs_cfg(&cfg.to_device(&gpu)?, 6, Some(2.5), &s)?
                    .flatten_all()?
                    .to_vec1()?;
                for (i, (x, y)) in a.iter().zip(&b).chain(c.iter().zip(&d)).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-6 + 1e-4 * x.abs(),
                        "{s:?} {i}: {x} vs {y} (v {v} cluster {cluster:?})"
                    );
                }
            }
            // the drafting graph's token gather (one kernel) on picks with missing entries
            let picks = (top_k(&cpu, 3)? - 0.5)?.round()?;
            let at: Vec<u32> = (0..40)
                .map(|i| (i * 7 % picks.elem_count()) as u32)
                .collect();
            let at = Tensor::new(at, &Device::Cpu)?;
            let a = pick_tokens(&picks, &at, 2)?.to_vec1::<u32>()?;
            let b = pick_tokens(&picks.to_device(&gpu)?, &at.to_device(&gpu)?, 2)?;
            assert_eq!(a, b.to_vec1::<u32>()?, "pick tokens v {v}");
            let k = 10;
            let us: Vec<f64> = (0..r.len() * k).map(|_| rng.random::<f64>()).collect();
            let ut = Tensor::from_vec(us, (r.len(), k), &Device::Cpu)?;
            let a = picks_to_host(&draw(&cpu, &ut)?)?;
            let b = picks_to_host(&draw(&dev, &ut.to_device(&gpu)?)?)?;
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.len(), y.len(), "draw v {v} cluster {cluster:?}");
                for (p, q) in x.iter().zip(y) {
                    assert_eq!(p.0, q.0, "draw v {v} cluster {cluster:?}");
                    assert!(
                        (p.1 - q.1).abs() <= 1e-5,
                        "draw v {v} cluster {cluster:?}: {p:?} vs {q:?}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every level's frontier output of a dynamic drafting computation over random probability
    /// rows (ties, zero probabilities), chained as the computation chains them.
    fn dynamic_fronts(rng: &mut StdRng, lv: DynamicLevels, v: usize) -> Result<Tensor> {
        let mut base = Tensor::zeros((lv.n_img, 1), DType::U32, &Device::Cpu)?;
        let mut out = Vec::new();
        for l in 0..=lv.depth {
            let lay = lv.layout(l);
            let r = rows(rng, lay.n_img * lay.rows_per_img, v);
            let picks = top_k(&tensor(&r), lay.k)?;
            let slot = (l > 0).then(|| (l - 1) * lv.k);
            let front = frontier(&picks, &base, lay, 1 + lv.depth * lv.k, slot)?;
            base = front
                .narrow(0, lay.chosen_scores(), lv.n_img * lv.k)?
                .reshape((lv.n_img, lv.k))?;
            out.push(front);
        }
        Tensor::cat(&out, 0)
    }

    /// `fronts` with the root level's candidates of image 0 at `-inf` and a child of the last
    /// one at 1.0: the second column goes to the first `-inf` candidate, not to that parent.
    fn forged(fronts: &Tensor, lv: DynamicLevels) -> Result<Tensor> {
        let mut f: Vec<u32> = fronts.to_vec1()?;
        for c in 0..lv.k {
            f[lv.layout(0).scores() + c] = f32::NEG_INFINITY.to_bits();
        }
        f[lv.level_at(1) + lv.layout(1).scores() + (lv.k - 1) * lv.k] = 1.0f32.to_bits();
        Tensor::new(f, fronts.device())
    }

    fn roots_of(n_img: usize) -> Result<Tensor> {
        let r: Vec<u32> = (0..n_img as u32).flat_map(|g| [100 + g, 30 + g]).collect();
        Tensor::from_vec(r, (n_img, 2), &Device::Cpu)
    }

    #[test]
    fn select_tree_writes_the_host_trees() -> Result<()> {
        use crate::decode::dynamic::{assemble, select_columns};
        let mut rng = StdRng::seed_from_u64(5);
        for (n_img, k, depth, total) in [(2, 4, 2, 12), (1, 3, 1, 13), (3, 10, 4, 59)] {
            let lv = DynamicLevels {
                n_img,
                k,
                depth,
                rows: 2 * n_img,
                total,
            };
            let fronts = dynamic_fronts(&mut rng, lv, 40)?;
            let out = select_tree(&fronts, &roots_of(n_img)?, lv)?.to_vec3::<f32>()?;
            let flat: Vec<u32> = fronts.to_vec1()?;
            let n = lv.cols();
            assert_eq!(n, total.min(k + depth * k * k + 1));
            for (g, o) in out.iter().enumerate() {
                let t = assemble(&lv.candidates(&flat, g), 100 + g as u32, total).unwrap();
                assert_eq!(t.len(), n);
                let tokens: Vec<u32> = o[0].iter().map(|&x| x as u32).collect();
                let pos: Vec<usize> = o[1].iter().map(|&x| x as usize).collect();
                let parents: Vec<usize> = o[2].iter().map(|&x| x as usize).collect();
                assert_eq!(tokens, t.tokens);
                assert_eq!(parents, t.parents);
                let depths: Vec<usize> = t.depths.iter().map(|d| 30 + g + d).collect();
                assert_eq!(pos, depths);
                let mask: Vec<f32> = o[3..].concat();
                assert_eq!(mask, t.additive_mask());
            }
        }
        // a child scoring above its parent: the parent is not selected, the column says -1
        let c = |token, score, parent| crate::decode::dynamic::Cand {
            token,
            score,
            parent,
        };
        let cands = [c(1, -2.0, None), c(2, -1.0, None), c(3, -0.5, Some(0))];
        let (order, parents) = select_columns(&cands, 3);
        assert_eq!(order, vec![1, 2]);
        assert_eq!(parents, vec![Some(0), Some(0), None]);
        assert!(assemble(&cands, 0, 3).is_err());
        let lv = DynamicLevels {
            n_img: 1,
            k: 3,
            depth: 1,
            rows: 2,
            total: 3,
        };
        let fronts = forged(&dynamic_fronts(&mut rng, lv, 40)?, lv)?;
        let out = select_tree(&fronts, &roots_of(1)?, lv)?.to_vec3::<f32>()?;
        assert_eq!(out[0][2], [0.0, 0.0, -1.0]);
        assert_eq!(
            out[0][3..],
            [
                [0.0, -f32::INFINITY, -f32::INFINITY],
                [0.0, 0.0, -f32::INFINITY],
                [-f32::INFINITY, -f32::INFINITY, 0.0]
            ]
        );
        assert!(select_tree(
            &Tensor::zeros(3, DType::U32, &Device::Cpu)?,
            &roots_of(1)?,
            lv
        )
        .is_err());
        Ok(())
    }

    /// The select-tree kernel against the CPU version, exactly: chained random levels (ties,
    /// zero probabilities), small and GPT-XL-sized trees, more columns than candidates, and a
    /// child forged to score above its parent (parent column -1).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_select_tree_matches_cpu() -> Result<()> {
        let gpu = Device::new_cuda(0)?;
        let mut rng = StdRng::seed_from_u64(8);
        for (n_img, k, depth, total, forge) in [
            (2, 10, 4, 59, false),
            (1, 3, 1, 13, false),
            (3, 8, 3, 100, false),
            (1, 3, 1, 3, true),
            (2, 20, 10, 1025, false),
        ] {
            let lv = DynamicLevels {
                n_img,
                k,
                depth,
                rows: 2 * n_img,
                total,
            };
            let fronts = dynamic_fronts(&mut rng, lv, 300)?;
            let fronts = if forge { forged(&fronts, lv)? } else { fronts };
            let roots = roots_of(n_img)?;
            let a = select_tree(&fronts, &roots, lv)?;
            let b = select_tree(&fronts.to_device(&gpu)?, &roots.to_device(&gpu)?, lv)?;
            let (a, b) = (a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);
            assert_eq!(a, b, "{lv:?}");
            if forge {
                assert!(
                    a[0][2].contains(&-1.0),
                    "the forged child's parent is dropped"
                );
            }
        }
        Ok(())
    }
}
