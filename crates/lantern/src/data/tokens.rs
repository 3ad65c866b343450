//! Token datasets: images already encoded by a VQ tokenizer, with their class labels, stored as
//! safetensors (`tokens` u32 `[n, h*w]`, `labels` u32 `[n]`, grid in the metadata).
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Token grids of `n` images plus labels.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDataset {
    /// Codes, `n * grid.0 * grid.1`, raster order per image.
    pub tokens: Vec<u32>,
    /// Class label per image.
    pub labels: Vec<u32>,
    /// Token grid (rows, columns).
    pub grid: (usize, usize),
    /// Codebook size the codes index.
    pub vocab: usize,
}

impl TokenDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Tokens per image.
    pub fn seq_len(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Codes of image `i`.
    pub fn sequence(&self, i: usize) -> &[u32] {
        let n = self.seq_len();
        &self.tokens[i * n..(i + 1) * n]
    }

    /// Saves to `path` (atomically: temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert(
            "tokens".to_string(),
            Tensor::from_vec(self.tokens.clone(), (n, self.seq_len()), &dev)?,
        );
        map.insert(
            "labels".to_string(),
            Tensor::from_vec(self.labels.clone(), n, &dev)?,
        );
        map.insert(
            "meta".to_string(),
            Tensor::new(
                &[self.grid.0 as u32, self.grid.1 as u32, self.vocab as u32],
                &dev,
            )?,
        );
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::Write {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        std::fs::rename(&tmp, path).map_err(|e| Error::Write {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Loads a file written by [`TokenDataset::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::load(path, format!("not a token dataset: {e}")))?;
        let get = |k: &str| {
            map.get(k).ok_or_else(|| {
                Error::load(
                    path,
                    format!("no `{k}` tensor: not a token dataset written by `lantern tokenize`"),
                )
            })
        };
        let tokens = get("tokens")?.flatten_all()?.to_vec1::<u32>()?;
        let labels = get("labels")?.to_vec1::<u32>()?;
        let meta = get("meta")?.to_vec1::<u32>()?;
        if meta.len() != 3 || tokens.len() != labels.len() * (meta[0] * meta[1]) as usize {
            return Err(Error::load(
                path,
                "inconsistent token dataset (tokens, labels and grid disagree)",
            ));
        }
        Ok(Self {
            tokens,
            labels,
            grid: (meta[0] as usize, meta[1] as usize),
            vocab: meta[2] as usize,
        })
    }
}
