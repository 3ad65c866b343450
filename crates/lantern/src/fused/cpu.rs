//! CPU versions of the fused kernels: the same algorithms as `kernels.cu`, one loop each, so
//! that CPU tests check the fused forward's indexing and numerics.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor, WithDType};

use super::{AttnDims, LinearDims, SmallLinear, WriteDims};

pub(super) fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("fused op: input {:?} is not contiguous", l.dims()),
    }
}

/// `x` rounded to `T` and back.
fn rnd<T: WithDType>(x: f32) -> f32 {
    T::from_f64(x as f64).to_f64() as f32
}

fn f<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}

/// Runs `$body` with `$x` bound to the typed slice of a float storage, wrapping the `Vec`
/// result back into the same variant.
macro_rules! float_dispatch {
    ($s:expr, |$x:ident: $t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($x) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::BF16($x) => {
                type $t = half::bf16;
                CpuStorage::BF16($body)
            }
            CpuStorage::F16($x) => {
                type $t = half::f16;
                CpuStorage::F16($body)
            }
            s => bail!("fused op: unsupported dtype {:?}", s.dtype()),
        }
    };
}

/// Typed slice of `s` (same dtype as the op's main input).
fn typed<'a, T: WithDType>(s: &'a CpuStorage, what: &str) -> Result<&'a [T]> {
    T::cpu_storage_as_slice(s)
        .map_err(|_| candle_core::Error::Msg(format!("fused op: {what} has dtype {:?}", s.dtype())))
}

fn f32_of(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
}

pub(super) fn norm(
    eps: f32,
    x: &CpuStorage,
    xl: &Layout,
    residual: Option<(&CpuStorage, &Layout)>,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<CpuStorage> {
    let cols = *xl.dims().last().unwrap_or(&1);
    Ok(float_dispatch!(x, |x: T| {
        let x = contiguous(x, xl)?;
        let w = contiguous(typed::<T>(w, "norm weight")?, wl)?;
        if w.len() != cols {
            bail!("norm weight has {} entries for rows of {cols}", w.len());
        }
        let res = match residual {
            Some((r, rl)) => Some(contiguous(typed::<T>(r, "residual")?, rl)?),
            None => None,
        };
        let n = x.len();
        let mut out = vec![T::from_f64(0.0); if res.is_some() { 2 * n } else { n }];
        let y0 = if res.is_some() { n } else { 0 };
        let mut row = vec![0f32; cols];
        for r in 0..n / cols.max(1) {
            let mut ss = 0f32;
            for (i, slot) in row.iter_mut().enumerate() {
                let at = r * cols + i;
                let mut v = f(x[at]);
                if let Some(res) = res {
                    let h = T::from_f64((v + f(res[at])) as f64);
                    out[at] = h;
                    v = f(h);
                }
                *slot = v;
                ss += v * v;
            }
            let inv = 1.0 / (ss / cols as f32 + eps).sqrt();
            for (i, (v, wi)) in row.iter().zip(w).enumerate() {
                out[y0 + r * cols + i] = T::from_f64((rnd::<T>(v * inv) * f(*wi)) as f64);
            }
        }
        out
    }))
}

pub(super) fn silu_mul(gu: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    let two_f = *l.dims().last().unwrap_or(&0);
    let ff = two_f / 2;
    Ok(float_dispatch!(gu, |gu: T| {
        let gu = contiguous(gu, l)?;
        let mut out = Vec::with_capacity(gu.len() / 2);
        for row in gu.chunks(two_f) {
            for j in 0..ff {
                let g = f(row[j]);
                let sg = rnd::<T>(g / (1.0 + (-g).exp()));
                out.push(T::from_f64((sg * f(row[ff + j])) as f64));
            }
        }
        out
    }))
}

/// See [`super::embed_cat`].
pub(super) fn embed_cat(
    table: &CpuStorage,
    tl: &Layout,
    ids: &CpuStorage,
    il: &Layout,
    feats: &CpuStorage,
    fl: &Layout,
    (n, d, v): (usize, usize, usize),
) -> Result<CpuStorage> {
    let ids = contiguous(typed::<u32>(ids, "ids")?, il)?;
    Ok(float_dispatch!(table, |table: T| {
        let table = contiguous(table, tl)?;
        let feats = contiguous(typed::<T>(feats, "features")?, fl)?;
        let mut out = Vec::with_capacity(n * 2 * d);
        for (&t, f) in ids.iter().zip(feats.chunks_exact(d)) {
            let t = (t as usize).min(v - 1);
            out.extend_from_slice(&table[t * d..(t + 1) * d]);
            out.extend_from_slice(f);
        }
        out
    }))
}

pub(super) fn write_kv(
    d: &WriteDims,
    kv: &mut CpuStorage,
    kv_l: &Layout,
    qkv: &CpuStorage,
    qkv_l: &Layout,
    rope: &CpuStorage,
    rope_l: &Layout,
) -> Result<()> {
    let rope = contiguous(typed::<f32>(rope, "RoPE table")?, rope_l)?;
    let base = kv_l.start_offset();
    macro_rules! go {
        ($kv:ident, $t:ty) => {{
            let qkv = contiguous(typed::<$t>(qkv, "qkv")?, qkv_l)?;
            let w = (d.h + 2 * d.cache.kvh) * d.cache.hd;
            let pairs = d.cache.hd / 2;
            for bb in 0..d.cache.b {
                for si in 0..d.s {
                    let src = &qkv[(bb * d.s + si) * w..][..w];
                    let rr = if d.rope_rows == 1 { 0 } else { bb };
                    let cs = &rope[(rr * d.s + si) * pairs * 2..][..pairs * 2];
                    for kh in 0..d.cache.kvh {
                        let k = &src[(d.h + kh) * d.cache.hd..][..d.cache.hd];
                        let v = &src[(d.h + d.cache.kvh + kh) * d.cache.hd..][..d.cache.hd];
                        let ko = base + d.cache.offset(0, bb, kh, d.at + si);
                        let vo = base + d.cache.offset(1, bb, kh, d.at + si);
                        for p in 0..pairs {
                            let (k0, k1) = (f(k[2 * p]), f(k[2 * p + 1]));
                            let (c, sn) = (cs[2 * p], cs[2 * p + 1]);
                            $kv[ko + 2 * p] = <$t>::from_f64((k0 * c - k1 * sn) as f64);
                            $kv[ko + 2 * p + 1] = <$t>::from_f64((k1 * c + k0 * sn) as f64);
                        }
                        $kv[vo..vo + d.cache.hd].copy_from_slice(v);
                    }
                }
            }
        }};
    }
    match kv {
        CpuStorage::F32(kv) => go!(kv, f32),
        CpuStorage::BF16(kv) => go!(kv, half::bf16),
        CpuStorage::F16(kv) => go!(kv, half::f16),
        s => bail!("fused K/V write: unsupported dtype {:?}", s.dtype()),
    }
    Ok(())
}

pub(super) fn attention(
    d: &AttnDims,
    qkv: &CpuStorage,
    qkv_l: &Layout,
    rope: &Tensor,
    kv: &Tensor,
    mask: Option<&Tensor>,
) -> Result<CpuStorage> {
    let rope = f32_of(rope)?;
    let mask = mask.map(f32_of).transpose()?;
    let (kv_guard, kv_l) = kv.storage_and_layout();
    let Storage::Cpu(kv_s) = &*kv_guard else {
        bail!("fused attention: the cache is not on the CPU")
    };
    let base = kv_l.start_offset();
    Ok(float_dispatch!(qkv, |qkv: T| {
        let qkv = contiguous(qkv, qkv_l)?;
        let kv = &typed::<T>(kv_s, "KV cache")?[base..];
        let w = (d.h + 2 * d.cache.kvh) * d.cache.hd;
        let pairs = d.cache.hd / 2;
        let group = d.h / d.cache.kvh;
        let scale = 1.0 / (d.cache.hd as f32).sqrt();
        let mut out = vec![T::from_f64(0.0); d.cache.b * d.s * d.h * d.cache.hd];
        let mut q = vec![0f32; d.cache.hd];
        let mut sc = vec![0f32; d.keys];
        for bb in 0..d.cache.b {
            for si in 0..d.s {
                let rr = if d.rope_rows == 1 { 0 } else { bb };
                let cs = &rope[(rr * d.s + si) * pairs * 2..][..pairs * 2];
                for hh in 0..d.h {
                    let src = &qkv[(bb * d.s + si) * w + hh * d.cache.hd..][..d.cache.hd];
                    for p in 0..pairs {
                        let (x0, x1) = (f(src[2 * p]), f(src[2 * p + 1]));
                        let (c, sn) = (cs[2 * p], cs[2 * p + 1]);
                        q[2 * p] = rnd::<T>(x0 * c - x1 * sn) * scale;
                        q[2 * p + 1] = rnd::<T>(x1 * c + x0 * sn) * scale;
                    }
                    let kh = hh / group;
                    let mut mx = f32::NEG_INFINITY;
                    for (j, scj) in sc.iter_mut().enumerate() {
                        let m = match &mask {
                            Some(m) => m[bb * d.mask_b + si * d.mask_s + j],
                            None => 0.0,
                        };
                        let hidden = (m == f32::NEG_INFINITY)
                            || d.causal_past.is_some_and(|past| j > past + si);
                        *scj = if hidden {
                            f32::NEG_INFINITY
                        } else {
                            let k = &kv[d.cache.offset(0, bb, kh, j)..][..d.cache.hd];
                            q.iter().zip(k).map(|(a, b)| a * f(*b)).sum::<f32>() + m
                        };
                        mx = mx.max(*scj);
                    }
                    let mut sum = 0f32;
                    for scj in sc.iter_mut() {
                        *scj = if *scj == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (*scj - mx).exp()
                        };
                        sum += *scj;
                    }
                    let o = &mut out[((bb * d.s + si) * d.h + hh) * d.cache.hd..][..d.cache.hd];
                    for (e, oe) in o.iter_mut().enumerate() {
                        let mut acc = 0f32;
                        for (j, p) in sc.iter().enumerate() {
                            if *p != 0.0 {
                                acc += p * f(kv[d.cache.offset(1, bb, kh, j) + e]);
                            }
                        }
                        *oe = T::from_f64((acc / sum) as f64);
                    }
                }
            }
        }
        out
    }))
}

pub(super) fn small_linear(
    op: &SmallLinear,
    d: &LinearDims,
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<CpuStorage> {
    let norm = match &op.norm {
        Some((t, eps)) => Some((f32_of(t)?, *eps)),
        None => None,
    };
    let res = op.residual.as_ref().map(f32_of).transpose()?;
    let swiglu = op.swiglu;
    Ok(float_dispatch!(x, |x: T| {
        let x = contiguous(x, xl)?;
        let w = contiguous(typed::<T>(w, "weight")?, wl)?;
        let (m, k, n) = (d.m, d.k, d.n);
        let mut xs: Vec<f32> = x.iter().map(|v| f(*v)).collect();
        if let Some((nw, eps)) = &norm {
            for row in xs.chunks_mut(k) {
                let ss: f32 = row.iter().map(|v| v * v).sum();
                let inv = 1.0 / (ss / k as f32 + eps).sqrt();
                for (v, wi) in row.iter_mut().zip(nw) {
                    *v = rnd::<T>(rnd::<T>(*v * inv) * wi);
                }
            }
        }
        let dot = |r: usize, o: usize| -> f32 {
            let wr = &w[o * k..][..k];
            xs[r * k..][..k]
                .iter()
                .zip(wr)
                .map(|(a, b)| a * f(*b))
                .sum()
        };
        let mut out = Vec::with_capacity(m * n);
        for r in 0..m {
            for o in 0..n {
                let a = dot(r, o);
                let y = if swiglu {
                    let g = rnd::<T>(a);
                    rnd::<T>(g / (1.0 + (-g).exp())) * rnd::<T>(dot(r, n + o))
                } else if let Some(res) = &res {
                    res[r * n + o] + rnd::<T>(a)
                } else {
                    a
                };
                out.push(T::from_f64(y as f64));
            }
        }
        out
    }))
}
