//! LlamaGen's 2D rotary position embedding (spec §1.5): interleaved adjacent pairs, the first
//! half of the pairs rotated by the grid row, the second half by the column, and ZERO rows
//! (cos = sin = 0) at condition positions and past the grid, which zero q and k there.
use candle_core::{DType, Device, Result, Tensor, D};

/// Precomputed f32 `cos` / `sin` tables `[rows, head_dim/2]`, and both interleaved
/// `[rows, head_dim/2, 2]` (what the fused kernels read: one gather per forward pass).
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    packed: Tensor,
}

/// Table values `(cos, sin)` flattened `[rows * pairs]` (f32), computed like LlamaGen's
/// `precompute_freqs_cis_2d` (fp32 frequencies and angles).
pub fn table_2d(
    head_dim: usize,
    grid: usize,
    base: f32,
    zero_before: usize,
    zero_after: usize,
) -> (Vec<f32>, Vec<f32>) {
    let pairs = head_dim / 2;
    let nf = pairs / 2;
    let freqs: Vec<f32> = (0..nf)
        .map(|j| 1.0f32 / base.powf((2 * j) as f32 / pairs as f32))
        .collect();
    let rows = zero_before + grid * grid + zero_after;
    let mut cos = vec![0f32; rows * pairs];
    let mut sin = vec![0f32; rows * pairs];
    for r in 0..grid {
        for c in 0..grid {
            let row = zero_before + r * grid + c;
            for p in 0..pairs {
                let ang = if p < nf {
                    r as f32 * freqs[p]
                } else {
                    c as f32 * freqs[p - nf]
                };
                cos[row * pairs + p] = ang.cos();
                sin[row * pairs + p] = ang.sin();
            }
        }
    }
    (cos, sin)
}

impl Rope {
    /// Builds the table for `zero_before` condition rows, a `grid`×`grid` image and `zero_after`
    /// extra zero rows.
    pub fn new(
        head_dim: usize,
        grid: usize,
        base: f32,
        zero_before: usize,
        zero_after: usize,
        device: &Device,
    ) -> Result<Self> {
        let pairs = head_dim / 2;
        let (cos, sin) = table_2d(head_dim, grid, base, zero_before, zero_after);
        let rows = cos.len() / pairs.max(1);
        let packed: Vec<f32> = cos.iter().zip(&sin).flat_map(|(&c, &s)| [c, s]).collect();
        Ok(Self {
            cos: Tensor::from_vec(cos, (rows, pairs), device)?,
            sin: Tensor::from_vec(sin, (rows, pairs), device)?,
            packed: Tensor::from_vec(packed, (rows, pairs, 2), device)?,
        })
    }

    /// Number of table rows (valid positions).
    pub fn rows(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Selects the table rows for `positions` once per forward pass.
    ///
    /// # Shapes
    /// - `positions`: `[s]` or `[b, s]` u32 (any integer dtype)
    pub fn select(&self, positions: &Tensor, b: usize, s: usize) -> Result<RopeRows> {
        let rows = self.rows();
        let max = positions
            .to_dtype(DType::U32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u32>()? as usize;
        if max >= rows {
            candle_core::bail!("RoPE position {max} is past the table ({rows} rows)");
        }
        self.select_unchecked(positions, b, s)
    }

    /// [`Rope::select`] without the range check, which reads the positions back to the host:
    /// for fixed-shape steps captured in CUDA graphs. Positions must be below [`Rope::rows`].
    pub fn select_unchecked(&self, positions: &Tensor, b: usize, s: usize) -> Result<RopeRows> {
        let pos = positions.to_dtype(DType::U32)?;
        let lead = match pos.rank() {
            1 if pos.dim(0)? == s => 1,
            1 => candle_core::bail!(
                "positions {:?} do not match sequence length {s}",
                pos.dims()
            ),
            2 if pos.dims() == [b, s] => b,
            2 => candle_core::bail!(
                "positions {:?} do not match [b, s] = [{b}, {s}]",
                pos.dims()
            ),
            r => candle_core::bail!("positions must be [s] or [b, s], got rank {r}"),
        };
        Ok(RopeRows {
            table: self.clone(),
            pos: pos.flatten_all()?,
            lead,
            s,
            cos: std::cell::OnceCell::new(),
            sin: std::cell::OnceCell::new(),
            packed: std::cell::OnceCell::new(),
        })
    }

    /// Rotates `x` at table rows `positions` (see [`RopeRows::apply`]).
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, s, _, _) = x.dims4()?;
        self.select(positions, b, s)?.apply(x)
    }
}

/// Table rows selected for one forward pass: gathered on first use, so that the fused path
/// runs one gather (the packed rows) and the reference path two (`cos`, `sin`).
#[derive(Clone, Debug)]
pub struct RopeRows {
    table: Rope,
    /// Table rows, flattened `[lead * s]` u32.
    pos: Tensor,
    /// 1 (positions shared by the batch) or b.
    lead: usize,
    s: usize,
    /// `[lead, s, 1, pairs]` f32 each.
    cos: std::cell::OnceCell<Tensor>,
    sin: std::cell::OnceCell<Tensor>,
    /// `[lead, s, pairs, 2]` (cos, sin) f32 for the fused kernels.
    packed: std::cell::OnceCell<Tensor>,
}

impl RopeRows {
    /// The rows packed for the fused kernels: `[1 or b, s, pairs, 2]` f32, cos then sin
    /// (one gather per forward, shared by all layers).
    pub fn packed(&self) -> Result<Tensor> {
        if let Some(p) = self.packed.get() {
            return Ok(p.clone());
        }
        let pairs = self.table.packed.dim(1)?;
        let p = self
            .table
            .packed
            .index_select(&self.pos, 0)?
            .reshape((self.lead, self.s, pairs, 2))?;
        Ok(self.packed.get_or_init(|| p).clone())
    }

    /// `cos` or `sin` rows `[lead, s, 1, pairs]`, gathered once.
    fn half(&self, cell: &std::cell::OnceCell<Tensor>, table: &Tensor) -> Result<Tensor> {
        if let Some(t) = cell.get() {
            return Ok(t.clone());
        }
        let pairs = table.dim(1)?;
        let t = table
            .index_select(&self.pos, 0)?
            .reshape((self.lead, self.s, 1, pairs))?;
        Ok(cell.get_or_init(|| t).clone())
    }

    fn cos(&self) -> Result<Tensor> {
        self.half(&self.cos, &self.table.cos)
    }

    fn sin(&self) -> Result<Tensor> {
        self.half(&self.sin, &self.table.sin)
    }

    /// Rotates adjacent pairs `(x[2p], x[2p+1])` in f32 and casts back to `x`'s dtype.
    ///
    /// # Shapes
    /// - `x`: `[b, s, heads, head_dim]` → same
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, h, d) = x.dims4()?;
        let pairs = d / 2;
        let xf = x.to_dtype(DType::F32)?.reshape((b, s, h, pairs, 2))?;
        let a = xf.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let bb = xf.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
        let (cos, sin) = (self.cos()?, self.sin()?);
        let o0 = (a.broadcast_mul(&cos)? - bb.broadcast_mul(&sin)?)?;
        let o1 = (bb.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
        Tensor::stack(&[o0, o1], D::Minus1)?
            .reshape((b, s, h, d))?
            .to_dtype(x.dtype())
    }

    /// The same rotation with candle's fused interleaved kernel (`rope_i`), heads first and in
    /// f32 (one launch instead of a dozen; no gradients, so for inference only).
    ///
    /// # Shapes
    /// - `x`: `[b, heads, s, head_dim]` f32 → same, contiguous
    pub fn apply_heads_first(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, s, _) = x.dims4()?;
        let (cos, sin) = (self.cos()?, self.sin()?);
        let pairs = cos.dim(D::Minus1)?;
        let (cos, sin) = if self.lead == 1 {
            (cos.reshape((s, pairs))?, sin.reshape((s, pairs))?)
        } else {
            (cos.reshape((b, s, pairs))?, sin.reshape((b, s, pairs))?)
        };
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rows_and_frequencies() {
        // head_dim 8: 4 pairs, 2 frequencies per axis, base^(-2j/4).
        let (cos, sin) = table_2d(8, 2, 10000.0, 1, 2);
        assert_eq!(cos.len(), (1 + 4 + 2) * 4);
        assert!(cos[..4].iter().chain(&sin[..4]).all(|&v| v == 0.0));
        assert!(cos[20..].iter().all(|&v| v == 0.0));
        // cell (r=1, c=0) is table row 1 + 2: row angles r*freq, col angles 0.
        let row = 3 * 4;
        assert!((sin[row] - 1f32.sin()).abs() < 1e-7);
        assert!((sin[row + 1] - (0.01f32).sin()).abs() < 1e-7);
        assert_eq!(sin[row + 2], 0.0);
        assert_eq!(cos[row + 3], 1.0);
    }

    #[test]
    fn fused_rotation_equals_reference() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 3, 10000.0, 2, 1, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 8), &dev)?; // [b, s, h, d]
        for pos in [
            Tensor::new(&[0u32, 5, 11, 7], &dev)?,
            Tensor::new(&[[1u32, 2, 3, 4], [9, 10, 0, 11]], &dev)?,
        ] {
            let want = rope.apply(&x, &pos)?;
            let rows = rope.select(&pos, 2, 4)?;
            let got = rows
                .apply_heads_first(&x.transpose(1, 2)?.contiguous()?)?
                .transpose(1, 2)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{diff}");
        }
        Ok(())
    }

    #[test]
    fn packed_rows_are_the_cos_and_sin_rows_interleaved() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 3, 10000.0, 2, 1, &dev)?;
        for (pos, lead) in [
            (Tensor::new(&[0u32, 5, 11, 7], &dev)?, 1),
            (Tensor::new(&[[1u32, 2, 3, 4], [9, 10, 0, 11]], &dev)?, 2),
        ] {
            let rows = rope.select(&pos, 2, 4)?;
            let want = Tensor::stack(
                &[rows.cos()?.squeeze(2)?, rows.sin()?.squeeze(2)?],
                D::Minus1,
            )?;
            let got = rows.packed()?;
            assert_eq!(got.dims(), [lead, 4, 4, 2]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        Ok(())
    }

    #[test]
    fn apply_rotates_adjacent_pairs() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(4, 2, 10000.0, 1, 0, &dev)?;
        let x = Tensor::new(&[1f32, 2., 3., 4.], &dev)?.reshape((1, 1, 1, 4))?;
        let zero = rope.apply(&x, &Tensor::new(&[0u32], &dev)?)?;
        assert!(zero
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|&v| v == 0.0));
        // position 3 = cell (1, 0): pair 0 rotated by angle 1, pair 1 unrotated.
        let y = rope
            .apply(&x, &Tensor::new(&[3u32], &dev)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((y[0] - (c - 2. * s)).abs() < 1e-6 && (y[1] - (2. * c + s)).abs() < 1e-6);
        assert_eq!(&y[2..], &[3., 4.]);
        Ok(())
    }
}
