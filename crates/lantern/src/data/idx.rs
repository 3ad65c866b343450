//! Reader for the IDX files of MNIST-style datasets (optionally gzipped).
use super::{ImageDataset, FASHION_MNIST_CLASSES};
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 60k training images.
    Train,
    /// The 10k test images.
    Test,
}

/// Reads one IDX file (gzipped when the name ends in `.gz`): returns the dimensions and bytes.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|e| {
        Error::load(
            path,
            format!("{e} (install the data with `apt-get install dataset-fashion-mnist`)"),
        )
    })?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::load(path, format!("not a valid gzip file: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(Error::load(path, "not an IDX file of unsigned bytes"));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(Error::load(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(Error::load(
            path,
            format!(
                "truncated or padded IDX data: header {dims:?} needs {expected} bytes, file has {}",
                data.len()
            ),
        ));
    }
    Ok((dims, data.to_vec()))
}

/// Loads a Fashion-MNIST split from `dir` (the Debian layout: `train-images-idx3-ubyte.gz`, ...).
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<ImageDataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |stem: &str| {
        let gz = dir.join(format!("{prefix}-{stem}-ubyte.gz"));
        if gz.exists() {
            gz
        } else {
            dir.join(format!("{prefix}-{stem}-ubyte"))
        }
    };
    let (idims, images) = read_idx(&find("images-idx3"))?;
    let (ldims, labels) = read_idx(&find("labels-idx1"))?;
    if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
        return Err(Error::load(
            dir,
            format!("image dims {idims:?} and label dims {ldims:?} do not match"),
        ));
    }
    Ok(ImageDataset {
        images,
        labels: labels.into_iter().map(u32::from).collect(),
        height: idims[1],
        width: idims[2],
        channels: 1,
        class_names: FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    })
}
