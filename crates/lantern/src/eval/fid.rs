//! Fréchet distance between Gaussian fits of two feature sets.
use crate::{Error, Result};

/// Mean and covariance of a set of feature vectors (f64).
#[derive(Debug, Clone)]
pub struct FeatureStats {
    /// Feature mean, length `d`.
    pub mean: Vec<f64>,
    /// Covariance `d x d`, row-major (unbiased, `n - 1`).
    pub cov: Vec<f64>,
    /// Number of samples.
    pub n: usize,
}

impl FeatureStats {
    /// Statistics of `n` rows of width `d` stored row-major in `features`.
    pub fn from_rows(features: &[f32], d: usize) -> Result<Self> {
        if d == 0 || !features.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "features",
                format!("{} values do not split into rows of {d}", features.len()),
            ));
        }
        let n = features.len() / d;
        if n < 2 {
            return Err(Error::invalid(
                "features",
                "FID needs at least 2 images per set",
            ));
        }
        let mut mean = vec![0f64; d];
        for row in features.chunks(d) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = vec![0f64; d * d];
        let mut c = vec![0f64; d];
        for row in features.chunks(d) {
            for (ci, (&x, m)) in c.iter_mut().zip(row.iter().zip(&mean)) {
                *ci = x as f64 - m;
            }
            for i in 0..d {
                let ci = c[i];
                for j in i..d {
                    cov[i * d + j] += ci * c[j];
                }
            }
        }
        for i in 0..d {
            for j in i..d {
                let v = cov[i * d + j] / (n as f64 - 1.0);
                cov[i * d + j] = v;
                cov[j * d + i] = v;
            }
        }
        Ok(Self { mean, cov, n })
    }
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations: (eigenvalues,
/// eigenvectors as columns, row-major).
fn sym_eig(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; d * d];
    (0..d).for_each(|i| v[i * d + i] = 1.0);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        let scale: f64 = (0..d)
            .map(|i| a[i * d + i] * a[i * d + i])
            .sum::<f64>()
            .max(1e-300);
        if off <= 1e-22 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let sgn = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sgn / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let akp = a[k * d + p];
                    let akq = a[k * d + q];
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let apk = a[p * d + k];
                    let aqk = a[q * d + k];
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let vkp = v[k * d + p];
                    let vkq = v[k * d + q];
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                out[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    out
}

/// `||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`.
pub fn fid(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    let d = a.mean.len();
    if b.mean.len() != d {
        return Err(Error::invalid(
            "features",
            format!("widths differ: {d} vs {}", b.mean.len()),
        ));
    }
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let (ea, va) = sym_eig(&a.cov, d);
    // S1^1/2 = V diag(sqrt(max(e,0))) V^T
    let mut sqrt_a = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            let mut s = 0.0;
            for k in 0..d {
                s += va[i * d + k] * ea[k].max(0.0).sqrt() * va[j * d + k];
            }
            sqrt_a[i * d + j] = s;
        }
    }
    let mut m = matmul(&matmul(&sqrt_a, &b.cov, d), &sqrt_a, d);
    for i in 0..d {
        for j in i + 1..d {
            let s = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = s;
            m[j * d + i] = s;
        }
    }
    let (em, _) = sym_eig(&m, d);
    let tr_sqrt: f64 = em.iter().map(|e| e.max(0.0).sqrt()).sum();
    let tr_a: f64 = (0..d).map(|i| a.cov[i * d + i]).sum();
    let tr_b: f64 = (0..d).map(|i| b.cov[i * d + i]).sum();
    Ok((mean_term + tr_a + tr_b - 2.0 * tr_sqrt).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(n: usize, d: usize, shift: f32, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * d)
            .map(|_| {
                // Box-Muller
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random::<f32>();
                shift + scale * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    }

    #[test]
    fn fid_matches_closed_form_for_diagonal_gaussians() {
        // Same set: 0. Shifted by m in every one of d dims with equal variance: d*m^2.
        // Scaled by s: d*(1 - s)^2.
        let d = 4;
        let a = FeatureStats::from_rows(&gaussian(20000, d, 0.0, 1.0, 1), d).unwrap();
        assert!(fid(&a, &a).unwrap() < 1e-6);
        let b = FeatureStats::from_rows(&gaussian(20000, d, 0.5, 1.0, 2), d).unwrap();
        let f = fid(&a, &b).unwrap();
        assert!((f - 1.0).abs() < 0.1, "fid {f}, expected ~1.0");
        let c = FeatureStats::from_rows(&gaussian(20000, d, 0.0, 2.0, 3), d).unwrap();
        let f = fid(&a, &c).unwrap();
        assert!((f - 4.0).abs() < 0.3, "fid {f}, expected ~4.0");
    }

    #[test]
    fn eigen_decomposition_reconstructs_matrix() {
        let a = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0];
        let (e, v) = sym_eig(&a, 3);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| v[i * 3 + k] * e[k] * v[j * 3 + k]).sum();
                assert!((r - a[i * 3 + j]).abs() < 1e-9);
            }
        }
    }
}
