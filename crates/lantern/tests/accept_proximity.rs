//! Proximity tables: brute-force comparison, tie order, .npy import, safetensors roundtrip, errors.
use lantern::accept::{codebook_fingerprint, Metric, Neighbors};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lantern-accept-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn codebook(rng: &mut StdRng, v: usize, d: usize) -> Vec<f32> {
    (0..v * d)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect()
}

/// Naive reference: sort all other codes by (distance, index).
fn brute(cb: &[f32], v: usize, d: usize, k: usize, normalized: bool) -> Vec<Vec<u32>> {
    let rows: Vec<Vec<f32>> = cb
        .chunks(d)
        .map(|r| {
            let n = if normalized {
                r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12)
            } else {
                1.0
            };
            r.iter().map(|x| x / n).collect()
        })
        .collect();
    (0..v)
        .map(|i| {
            let mut c: Vec<(f32, u32)> = (0..v)
                .filter(|&j| j != i)
                .map(|j| {
                    let d2 = rows[i]
                        .iter()
                        .zip(&rows[j])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum();
                    (d2, j as u32)
                })
                .collect();
            c.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            c[..k].iter().map(|x| x.1).collect()
        })
        .collect()
}

#[test]
fn build_matches_brute_force_both_metrics() {
    let mut rng = StdRng::seed_from_u64(1);
    let (v, d, k) = (200, 8, 30);
    let cb = codebook(&mut rng, v, d);
    for (metric, norm) in [(Metric::L2, false), (Metric::L2Normalized, true)] {
        let nb = Neighbors::build(&cb, v, d, k, metric).unwrap();
        assert_eq!((nb.vocab(), nb.k_max()), (v, k));
        let want = brute(&cb, v, d, k, norm);
        for (i, w) in want.iter().enumerate() {
            assert_eq!(&nb.row(i as u32), w, "row {i} metric {metric:?}");
        }
    }
}

#[test]
fn ties_are_broken_by_index() {
    // codes 0..6 at three points: {0,3} at a, {1,4} at b, {2,5} at c; b and c equidistant from a.
    let pts = [[0.0f32, 0.0], [1.0, 0.0], [0.0, 1.0]];
    let cb: Vec<f32> = (0..6).flat_map(|i| pts[i % 3]).collect();
    let nb = Neighbors::build(&cb, 6, 2, 5, Metric::L2).unwrap();
    assert_eq!(nb.row(0), vec![3, 1, 2, 4, 5]);
    assert_eq!(nb.row(4), vec![1, 0, 3, 2, 5]);
}

fn write_npy(
    path: &PathBuf,
    descr: &str,
    item: usize,
    shape: (usize, usize),
    vals: &[i64],
    v2: bool,
) {
    let (rows, cols) = shape;
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let pre = if v2 { 12 } else { 10 };
    while (pre + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    if v2 {
        out.extend([2u8, 0]);
        out.extend((header.len() as u32).to_le_bytes());
    } else {
        out.extend([1u8, 0]);
        out.extend((header.len() as u16).to_le_bytes());
    }
    out.extend(header.as_bytes());
    for &x in vals {
        out.extend(&x.to_le_bytes()[..item]);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn npy_import_matches_build() {
    let mut rng = StdRng::seed_from_u64(2);
    let (v, d) = (50, 4);
    let cb = codebook(&mut rng, v, d);
    let full = Neighbors::build(&cb, v, d, v - 1, Metric::L2).unwrap();
    let vals: Vec<i64> = (0..v as u32)
        .flat_map(|i| full.row(i))
        .map(|x| x as i64)
        .collect();
    let five = Neighbors::build(&cb, v, d, 5, Metric::L2).unwrap();
    for (name, descr, item, v2) in [
        ("u2.npy", "<u2", 2, false),
        ("i8.npy", "<i8", 8, true),
        ("i4.npy", "<i4", 4, false),
    ] {
        let path = tmp(name);
        write_npy(&path, descr, item, (v, v - 1), &vals, v2);
        let all = Neighbors::from_npy(&path, None).unwrap();
        assert_eq!(all.k_max(), v - 1);
        for i in 0..v as u32 {
            assert_eq!(all.row(i), full.row(i));
        }
        let k5 = Neighbors::from_npy(&path, Some(5)).unwrap();
        for i in 0..v as u32 {
            assert_eq!(k5.row(i), five.row(i), "{name} row {i}");
        }
        assert!(Neighbors::from_npy(&path, Some(v)).is_err());
        assert!(Neighbors::from_npy(&path, Some(0)).is_err());
    }
    // a float array, a truncated file and a self-referencing row are rejected
    let bad = tmp("f4.npy");
    write_npy(&bad, "<f4", 4, (v, v - 1), &vals, false);
    let e = Neighbors::from_npy(&bad, None).unwrap_err().to_string();
    assert!(e.contains("not supported"), "{e}");
    write_npy(&bad, "<u2", 2, (v, v - 1), &vals[..vals.len() - 3], false);
    let e = Neighbors::from_npy(&bad, None).unwrap_err().to_string();
    assert!(e.contains("ends before"), "{e}");
    let mut selfref = vals.clone();
    selfref[0] = 0;
    write_npy(&bad, "<u2", 2, (v, v - 1), &selfref, false);
    assert!(Neighbors::from_npy(&bad, None).is_err());
}

#[test]
fn save_load_roundtrip_and_codebook_check() {
    let mut rng = StdRng::seed_from_u64(3);
    let (v, d, k) = (64, 8, 10);
    let cb = codebook(&mut rng, v, d);
    let nb = Neighbors::build(&cb, v, d, k, Metric::L2Normalized).unwrap();
    let path = tmp("nb.safetensors");
    nb.save(&path, "test codebook").unwrap();
    let back = Neighbors::load(&path).unwrap();
    assert_eq!(back, nb);
    assert_eq!(back.metric(), Some(Metric::L2Normalized));
    let fp = codebook_fingerprint(&cb);
    assert_eq!(back.fingerprint(), Some(fp));
    back.check_codebook(v, Some(fp)).unwrap();
    back.check_codebook(v, None).unwrap();
    let e = back.check_codebook(v + 1, None).unwrap_err().to_string();
    assert!(
        e.contains("64 codes") && e.contains("65") && e.contains("rebuild"),
        "{e}"
    );
    let mut other = cb.clone();
    other[0] += 1.0;
    assert_ne!(codebook_fingerprint(&other), fp);
    assert!(back
        .check_codebook(v, Some(codebook_fingerprint(&other)))
        .is_err());
}

#[test]
fn errors_for_bad_inputs_and_files() {
    let mut rng = StdRng::seed_from_u64(4);
    let cb = codebook(&mut rng, 10, 2);
    assert!(Neighbors::build(&cb, 10, 2, 0, Metric::L2).is_err());
    assert!(Neighbors::build(&cb, 10, 2, 10, Metric::L2).is_err());
    assert!(Neighbors::build(&cb, 10, 2, 9, Metric::L2).is_ok());
    assert!(Neighbors::build(&[], 0, 2, 1, Metric::L2).is_err());
    assert!(Neighbors::build(&cb, 11, 2, 1, Metric::L2).is_err());
    // random bytes, a missing file, and a safetensors file of another kind
    let junk = tmp("junk.bin");
    std::fs::write(&junk, b"definitely not a table").unwrap();
    assert!(Neighbors::load(&junk).is_err());
    let e = Neighbors::from_npy(&junk, None).unwrap_err().to_string();
    assert!(e.contains("not a .npy"), "{e}");
    assert!(Neighbors::load(&tmp("missing.safetensors")).is_err());
    let other = tmp("other.safetensors");
    let data = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![2, 2], &data)
            .unwrap();
    safetensors::serialize_to_file([("weight", view)], None, &other).unwrap();
    let e = Neighbors::load(&other).unwrap_err().to_string();
    assert!(e.contains("not a lantern neighbour table"), "{e}");
}

/// Timing of the real-size build; run with
/// `cargo test -p lantern --release --test accept_proximity -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_16384x8_k1000() {
    let mut rng = StdRng::seed_from_u64(5);
    let cb = codebook(&mut rng, 16384, 8);
    let t = std::time::Instant::now();
    let nb = Neighbors::build(&cb, 16384, 8, 1000, Metric::L2).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "built 16384x8 k=1000 in {:.2?} ({threads} threads)",
        t.elapsed()
    );
    assert_eq!(nb.k_max(), 1000);
}
