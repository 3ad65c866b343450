//! The drafter distributions of one tree level (the rows after every image's fed nodes) and the
//! picks tree builders take from them. [`DeviceLevel`] keeps the rows where the logits were
//! made, and its pick blocks stay there too: static trees feed the next level from them on the
//! device and fetch every level's picks in one transfer after the last level, dynamic trees
//! fetch each level's top-k (they rank them on the host). [`HostLevel`] holds host rows (tests;
//! top-p sampling on CUDA, see [`crate::fused::picks::probs_on_device`]).
use super::draft::{draw_with_uniforms, top_k_indices};
use super::tree::QDist;
use crate::fused::picks::{self, MAX_PICKS};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngCore};

/// One request of a level: `k` picks from row `row` of image `g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Image.
    pub g: usize,
    /// Row among the image's rows of the level (the fed node, in feeding order).
    pub row: usize,
    /// Picks wanted.
    pub k: usize,
}

/// Picks of one request: (token, probability) pairs.
pub type Picks = Vec<(usize, f32)>;

/// The drafter distributions of one level, for every image.
pub trait DraftLevel {
    /// Vocabulary size of the rows.
    fn vocab(&self) -> usize;

    /// The picks of every request as a block `[want.len(), k, 2]` of (token, probability)
    /// pairs, token `-1` past a request's picks, `k` = [`widest`] of the requests; left where
    /// the rows are (no transfer, no synchronisation). Without `uniforms`: each row's top `k`,
    /// largest first (ties: lower token first), as [`top_k_indices`]. With `uniforms` (`[want.len()
    /// * k]`, from [`level_uniforms`]): draws without replacement, request i taking its row of
    /// uniforms up to the first negative, as [`draw_with_uniforms`].
    fn pick_block(&mut self, want: &[Want], uniforms: Option<Vec<f64>>) -> Result<Tensor>;

    /// Row `row` of image `g` as a tree's drafter distribution (left on the device if there).
    fn dist(&self, g: usize, row: usize) -> Result<QDist>;

    /// Per request: the top `k` tokens of the row with their probabilities on the host (one
    /// transfer of the [`DraftLevel::pick_block`]).
    fn top_k(&mut self, want: &[Want]) -> Result<Vec<Picks>> {
        let block = self.pick_block(want, None)?;
        Ok(cut(picks::picks_to_host(&block)?, want))
    }
}

/// Most picks of any request, capped by the vocabulary: the width of a level's pick block.
pub fn widest(want: &[Want], vocab: usize) -> usize {
    want.iter().map(|w| w.k).max().unwrap_or(0).min(vocab)
}

/// The uniforms of one level's draws: request i takes exactly `min(want[i].k, k)` uniforms
/// from `rngs[g]` (in request order), whatever the row's mass (so that no count has to come
/// back from the device first); the rest of its `k` entries are `-1`.
pub fn level_uniforms(want: &[Want], k: usize, rngs: &mut [&mut dyn RngCore]) -> Vec<f64> {
    let mut us = vec![-1f64; want.len() * k];
    for (w, u) in want.iter().zip(us.chunks_exact_mut(k.max(1))) {
        for x in u.iter_mut().take(w.k) {
            *x = rngs[w.g].random::<f64>();
        }
    }
    us
}

/// Picks cut to each request's `k`.
fn cut(mut picks: Vec<Picks>, want: &[Want]) -> Vec<Picks> {
    for (p, w) in picks.iter_mut().zip(want) {
        p.truncate(w.k);
    }
    picks
}

/// Host picks as a CPU pick block `[n, k, 2]` (`-1` past each request's picks).
fn block_of(picks: &[Picks], k: usize) -> Result<Tensor> {
    let mut flat = vec![0f32; picks.len() * k * 2];
    for (p, out) in picks.iter().zip(flat.chunks_exact_mut((2 * k).max(1))) {
        out.chunks_exact_mut(2).for_each(|pair| pair[0] = -1.0);
        for (pair, &(i, v)) in out.chunks_exact_mut(2).zip(p) {
            pair[0] = i as f32;
            pair[1] = v;
        }
    }
    Ok(Tensor::from_vec(flat, (picks.len(), k, 2), &Device::Cpu)?)
}

/// Host rows: `rows[g][i]` is the distribution after image g's i-th fed node.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLevel {
    rows: Vec<Vec<Vec<f32>>>,
}

impl HostLevel {
    /// A level of `rows[g][i]`.
    pub fn new(rows: Vec<Vec<Vec<f32>>>) -> Self {
        Self { rows }
    }

    /// A root level: one row per image.
    pub fn roots(rows: Vec<Vec<f32>>) -> Self {
        Self::new(rows.into_iter().map(|r| vec![r]).collect())
    }

    fn row(&self, g: usize, row: usize) -> Result<&[f32]> {
        self.rows
            .get(g)
            .and_then(|r| r.get(row))
            .map(|r| r.as_slice())
            .ok_or_else(|| {
                crate::Error::invalid("draft level", format!("no row {row} of image {g}"))
            })
    }
}

impl DraftLevel for HostLevel {
    fn vocab(&self) -> usize {
        self.rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, |r| r.len())
    }

    fn pick_block(&mut self, want: &[Want], uniforms: Option<Vec<f64>>) -> Result<Tensor> {
        let k = widest(want, self.vocab());
        let picks = want
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let r = self.row(w.g, w.row)?;
                Ok(match &uniforms {
                    None => top_k_indices(r, k).into_iter().map(|i| (i, r[i])).collect(),
                    Some(us) => {
                        let u = &us[i * k..(i + 1) * k];
                        let n = u.iter().take_while(|&&x| x >= 0.0).count();
                        draw_with_uniforms(r, &u[..n])
                    }
                })
            })
            .collect::<Result<Vec<Picks>>>()?;
        block_of(&picks, k)
    }

    fn dist(&self, g: usize, row: usize) -> Result<QDist> {
        Ok(QDist::Host(self.row(g, row)?.to_vec()))
    }
}

/// Device rows: `probs` `[n_img * per_image, V]` f32, image g's row i at `g * per_image + i`.
#[derive(Debug, Clone)]
pub struct DeviceLevel {
    probs: Tensor,
    per_image: usize,
}

impl DeviceLevel {
    /// A level of `probs` (`[n_img * per_image, V]`, made f32).
    pub fn new(probs: Tensor, per_image: usize) -> Result<Self> {
        Ok(Self {
            probs: probs.to_dtype(DType::F32)?,
            per_image,
        })
    }

    /// The requested rows `[want.len(), V]` (no gather when they are all rows in order).
    fn select(&self, want: &[Want]) -> Result<Tensor> {
        let ids: Vec<u32> = want
            .iter()
            .map(|w| (w.g * self.per_image + w.row) as u32)
            .collect();
        if ids.len() == self.probs.dim(0)? && ids.iter().enumerate().all(|(i, &r)| r as usize == i)
        {
            return Ok(self.probs.clone());
        }
        let ids = Tensor::from_vec(ids, want.len(), self.probs.device())?;
        Ok(self.probs.index_select(&ids, 0)?)
    }

    /// The requested rows on the host (requests of more than [`MAX_PICKS`] picks).
    fn host(&self, want: &[Want]) -> Result<HostLevel> {
        let sel = self.select(want)?;
        let v = sel.dim(1)?;
        let flat: Vec<f32> = sel.flatten_all()?.to_vec1()?;
        let mut rows = vec![Vec::new(); want.iter().map(|w| w.g + 1).max().unwrap_or(0)];
        for (w, r) in want.iter().zip(flat.chunks_exact(v.max(1))) {
            let img: &mut Vec<Vec<f32>> = &mut rows[w.g];
            img.resize(img.len().max(w.row + 1), Vec::new());
            img[w.row] = r.to_vec();
        }
        Ok(HostLevel::new(rows))
    }
}

impl DraftLevel for DeviceLevel {
    fn vocab(&self) -> usize {
        self.probs.dims().get(1).copied().unwrap_or(0)
    }

    fn pick_block(&mut self, want: &[Want], uniforms: Option<Vec<f64>>) -> Result<Tensor> {
        let k = widest(want, self.vocab());
        if k == 0 || k > MAX_PICKS {
            return self.host(want)?.pick_block(want, uniforms);
        }
        let sel = self.select(want)?;
        Ok(match uniforms {
            None => picks::top_k(&sel, k)?,
            Some(us) => {
                let us = Tensor::from_vec(us, (want.len(), k), sel.device())?;
                picks::draw(&sel, &us)?
            }
        })
    }

    fn dist(&self, g: usize, row: usize) -> Result<QDist> {
        Ok(QDist::device(self.probs.clone(), g * self.per_image + row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::picks;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Two images of three rows over 6 tokens, with ties and a row of little mass.
    fn rows() -> Vec<Vec<Vec<f32>>> {
        vec![
            vec![
                vec![0.1, 0.3, 0.3, 0.0, 0.2, 0.1],
                vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                vec![0.5, 0.0, 0.0, 0.0, 0.0, 0.5],
            ],
            vec![
                vec![0.2; 6],
                vec![0.05, 0.15, 0.25, 0.35, 0.1, 0.1],
                vec![0.0, 0.7, 0.0, 0.3, 0.0, 0.0],
            ],
        ]
    }

    fn both() -> (HostLevel, DeviceLevel) {
        let r = rows();
        let flat: Vec<f32> = r.iter().flatten().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (6, 6), &Device::Cpu).unwrap();
        (HostLevel::new(r), DeviceLevel::new(t, 3).unwrap())
    }

    fn wants() -> Vec<Want> {
        let mut w = Vec::new();
        for (g, row, k) in [(0, 2, 3), (0, 0, 4), (1, 1, 2), (1, 2, 5), (0, 1, 1)] {
            w.push(Want { g, row, k });
        }
        w
    }

    /// Both levels' pick blocks on the host.
    fn blocks(
        h: &mut HostLevel,
        d: &mut DeviceLevel,
        w: &[Want],
        us: Option<Vec<f64>>,
    ) -> Result<(Vec<Picks>, Vec<Picks>)> {
        Ok((
            picks::picks_to_host(&h.pick_block(w, us.clone())?)?,
            picks::picks_to_host(&d.pick_block(w, us)?)?,
        ))
    }

    #[test]
    fn device_level_picks_equal_host_level_picks() -> Result<()> {
        let (mut h, mut d) = both();
        let w = wants();
        assert_eq!(d.top_k(&w)?, h.top_k(&w)?);
        assert_eq!(
            h.top_k(&w)?[1],
            vec![(1, 0.3), (2, 0.3), (4, 0.2), (0, 0.1)]
        );
        let (mut a, mut b) = (StdRng::seed_from_u64(4), StdRng::seed_from_u64(5));
        let (mut a2, mut b2) = (a.clone(), b.clone());
        let k = widest(&w, 6);
        for _ in 0..20 {
            let us = level_uniforms(&w, k, &mut [&mut a, &mut b]);
            let (hp, dp) = blocks(&mut h, &mut d, &w, Some(us))?;
            assert_eq!(dp, hp);
            // a request larger than the row's mass stops at the mass
            assert_eq!(hp[0].len(), 2);
            assert_eq!(hp[3].len(), 2);
            assert!(hp.iter().zip(&w).all(|(p, w)| p.len() <= w.k));
        }
        // exactly k uniforms per request, whatever the mass: 20 * (3 + 4 + 1) for image 0
        for _ in 0..20 * 8 {
            a2.random::<f64>();
        }
        for _ in 0..20 * 7 {
            b2.random::<f64>();
        }
        assert_eq!(a.random::<u64>(), a2.random::<u64>(), "image 0 stream");
        assert_eq!(b.random::<u64>(), b2.random::<u64>(), "image 1 stream");
        for (g, r) in [(0, 0), (1, 2)] {
            assert_eq!(d.dist(g, r)?.values()?, h.dist(g, r)?.values()?);
        }
        Ok(())
    }

    #[test]
    fn requests_wider_than_the_op_take_the_host_path() -> Result<()> {
        let v = MAX_PICKS + 6;
        let row: Vec<f32> = (0..v).map(|i| ((i * 7) % 13) as f32).collect();
        let t = Tensor::from_vec(row.clone(), (1, v), &Device::Cpu)?;
        let mut d = DeviceLevel::new(t, 1)?;
        let w = [Want { g: 0, row: 0, k: v }];
        let want: Picks = top_k_indices(&row, v)
            .into_iter()
            .map(|i| (i, row[i]))
            .collect();
        assert_eq!(d.top_k(&w)?, vec![want]);
        Ok(())
    }

    /// GPT-XL drafting shapes (10 nodes per image, 2 images, 16384 codes), on CUDA when built
    /// with it: the picks of a device level equal those of the host rows it replaces, and the
    /// time of both per level is printed (`--ignored --nocapture`).
    #[test]
    #[ignore = "timing; run with --ignored --nocapture (on a GPU with --features cuda)"]
    fn xl_level_picks_match_host_rows_and_time() -> Result<()> {
        use crate::sampling::{row_probs, SamplingParams};
        use std::time::Instant;
        let dev = Device::cuda_if_available(0)?;
        let (n_img, s, v, k) = (2usize, 10usize, 16384usize, 4usize);
        let logits = Tensor::randn(0f32, 3.0, (n_img * s, v), &dev)?;
        let want: Vec<Want> = (0..n_img)
            .flat_map(|g| (0..s).map(move |row| Want { g, row, k }))
            .collect();
        for sampling in [SamplingParams::greedy(), SamplingParams::default()] {
            let reps = 20;
            let mut host_s = 0.0;
            let mut dev_s = 0.0;
            for r in 0..reps {
                let mut a = StdRng::seed_from_u64(r);
                let mut b = StdRng::seed_from_u64(r + 100);
                let us = level_uniforms(&want, k, &mut [&mut a, &mut b]);
                let t = Instant::now();
                let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                let rows: Vec<Vec<Vec<f32>>> = (0..n_img)
                    .map(|g| {
                        (0..s)
                            .map(|i| {
                                let at = (g * s + i) * v;
                                row_probs(&sampling, &flat[at..at + v])
                            })
                            .collect()
                    })
                    .collect();
                let mut h = HostLevel::new(rows);
                let hp = if sampling.is_greedy() {
                    h.top_k(&want)?
                } else {
                    picks::picks_to_host(&h.pick_block(&want, Some(us.clone()))?)?
                };
                // the first repetition warms up (kernel loading)
                if r > 0 {
                    host_s += t.elapsed().as_secs_f64();
                }
                let t = Instant::now();
                let mut d = DeviceLevel::new(picks::draft_probs(&logits, &sampling)?, s)?;
                let dp = if sampling.is_greedy() {
                    d.top_k(&want)?
                } else {
                    picks::picks_to_host(&d.pick_block(&want, Some(us.clone()))?)?
                };
                if r > 0 {
                    dev_s += t.elapsed().as_secs_f64();
                }
                for (x, y) in hp.iter().zip(&dp) {
                    let tx: Vec<usize> = x.iter().map(|p| p.0).collect();
                    let ty: Vec<usize> = y.iter().map(|p| p.0).collect();
                    assert_eq!(tx, ty, "{sampling:?}");
                    for (p, q) in x.iter().zip(y) {
                        assert!((p.1 - q.1).abs() <= 1e-4 * p.1.max(1e-3), "{p:?} vs {q:?}");
                    }
                }
            }
            println!(
                "{:?} {} rows x {v}: host rows {:.3} ms, device picks {:.3} ms per level",
                sampling,
                n_img * s,
                host_s * 1e3 / (reps - 1) as f64,
                dev_s * 1e3 / (reps - 1) as f64
            );
        }
        Ok(())
    }
}
