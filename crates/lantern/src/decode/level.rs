//! The drafter distributions of one tree level (the rows after every image's fed nodes) and the
//! picks tree builders take from them. [`DeviceLevel`] keeps the rows where the logits were
//! made and sends the host only the picks (one small transfer per batched request);
//! [`HostLevel`] holds host rows (tests; top-p sampling on CUDA, see
//! [`crate::fused::picks::probs_on_device`]).
use super::draft::{draw_without_replacement, top_k_indices};
use super::tree::QDist;
use crate::fused::picks::{self, MAX_PICKS};
use crate::Result;
use candle_core::{DType, Tensor};
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

    /// Per request: the top `k` tokens of the row with their probabilities, largest first
    /// (ties: lower token first), as [`top_k_indices`].
    fn top_k(&mut self, want: &[Want]) -> Result<Vec<Picks>>;

    /// Per request, in order: up to `k` tokens drawn without replacement with their
    /// conditional probabilities, the uniforms taken from `rngs[g]` as
    /// [`draw_without_replacement`] takes them.
    fn draw(&mut self, want: &[Want], rngs: &mut [&mut dyn RngCore]) -> Result<Vec<Picks>>;

    /// Row `row` of image `g` as a tree's drafter distribution (left on the device if there).
    fn dist(&self, g: usize, row: usize) -> Result<QDist>;
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

    fn top_k(&mut self, want: &[Want]) -> Result<Vec<Picks>> {
        want.iter()
            .map(|w| {
                let r = self.row(w.g, w.row)?;
                Ok(top_k_indices(r, w.k)
                    .into_iter()
                    .map(|i| (i, r[i]))
                    .collect())
            })
            .collect()
    }

    fn draw(&mut self, want: &[Want], rngs: &mut [&mut dyn RngCore]) -> Result<Vec<Picks>> {
        want.iter()
            .map(|w| {
                Ok(draw_without_replacement(
                    self.row(w.g, w.row)?,
                    w.k,
                    &mut *rngs[w.g],
                ))
            })
            .collect()
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

/// Most picks of any request, capped by the vocabulary.
fn widest(want: &[Want], vocab: usize) -> usize {
    want.iter().map(|w| w.k).max().unwrap_or(0).min(vocab)
}

/// Picks cut to each request's `k`.
fn cut(mut picks: Vec<Picks>, want: &[Want]) -> Vec<Picks> {
    for (p, w) in picks.iter_mut().zip(want) {
        p.truncate(w.k);
    }
    picks
}

impl DraftLevel for DeviceLevel {
    fn vocab(&self) -> usize {
        self.probs.dims().get(1).copied().unwrap_or(0)
    }

    fn top_k(&mut self, want: &[Want]) -> Result<Vec<Picks>> {
        let k = widest(want, self.vocab());
        if k == 0 {
            return Ok(vec![Vec::new(); want.len()]);
        }
        if k > MAX_PICKS {
            return self.host(want)?.top_k(want);
        }
        let picks = picks::picks_to_host(&picks::top_k(&self.select(want)?, k)?)?;
        Ok(cut(picks, want))
    }

    fn draw(&mut self, want: &[Want], rngs: &mut [&mut dyn RngCore]) -> Result<Vec<Picks>> {
        let k = widest(want, self.vocab());
        if k == 0 {
            return Ok(vec![Vec::new(); want.len()]);
        }
        if k > MAX_PICKS {
            return self.host(want)?.draw(want, rngs);
        }
        let sel = self.select(want)?;
        // the host function takes one uniform per draw and draws while mass is left: the
        // positive entries of each row say how many (one small transfer)
        let positive: Vec<u32> = sel.gt(0f32)?.to_dtype(DType::U32)?.sum(1)?.to_vec1()?;
        let mut us = vec![-1f64; want.len() * k];
        for ((w, &n), u) in want.iter().zip(&positive).zip(us.chunks_exact_mut(k)) {
            for x in u.iter_mut().take(w.k.min(n as usize)) {
                *x = rngs[w.g].random::<f64>();
            }
        }
        let us = Tensor::from_vec(us, (want.len(), k), sel.device())?;
        let picks = picks::picks_to_host(&picks::draw(&sel, &us)?)?;
        Ok(cut(picks, want))
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
        for _ in 0..20 {
            let got = d.draw(&w, &mut [&mut a, &mut b])?;
            let want = h.draw(&w, &mut [&mut a2, &mut b2])?;
            assert_eq!(got, want);
            // a request larger than the row's mass stops at the mass
            assert_eq!(got[0].len(), 2);
            assert_eq!(got[3].len(), 2);
        }
        assert_eq!(
            a.random::<u64>(),
            a2.random::<u64>(),
            "image 0 streams in step"
        );
        assert_eq!(
            b.random::<u64>(),
            b2.random::<u64>(),
            "image 1 streams in step"
        );
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
                let (mut a2, mut b2) = (a.clone(), b.clone());
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
                    h.draw(&want, &mut [&mut a, &mut b])?
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
                    d.draw(&want, &mut [&mut a2, &mut b2])?
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
