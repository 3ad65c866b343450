//! Image output: decoded tensors → uint8 pixels (the official `save_image` conversion), PNG files
//! and grids written atomically, and token-grid JSON files.
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Converts one value in [-1, 1] to a byte exactly as torchvision's
/// `save_image(normalize=True, value_range=(-1, 1))` does: clamp to [-1, 1], `(x + 1) / 2`,
/// then `trunc(v * 255 + 0.5)` clamped to [0, 255] (spec §2.4, §7.14).
pub fn value_to_u8(x: f32) -> u8 {
    let v = (x.clamp(-1.0, 1.0) + 1.0) / 2.0;
    (v * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// Converts a batch of images to interleaved (HWC) bytes, one `Vec` per image.
///
/// # Shapes
/// `images [b, c, h, w]` float in [-1, 1] → `b` vectors of `h * w * c` bytes
pub fn to_u8(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, c, h, w) = images.dims4()?;
    let hwc = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((b, h * w * c))?
        .to_vec2::<f32>()?;
    Ok(hwc
        .into_iter()
        .map(|row| row.into_iter().map(value_to_u8).collect())
        .collect())
}

/// Converts interleaved bytes of one image back to a `[c, h, w]` f32 tensor in [-1, 1]
/// (`x / 127.5 - 1`), the inverse used to feed datasets to the encoder.
pub fn u8_to_tensor(
    pixels: &[u8],
    h: usize,
    w: usize,
    c: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    check_len(pixels.len(), w, h, c)?;
    let v: Vec<f32> = pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(v, (h, w, c), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

fn check_len(len: usize, w: usize, h: usize, channels: usize) -> Result<()> {
    if !(channels == 1 || channels == 3) {
        return Err(Error::invalid(
            "image channels",
            format!("{channels} channels; only 1 (grey) or 3 (RGB) can be written"),
        ));
    }
    if w == 0 || h == 0 || len != w * h * channels {
        return Err(Error::invalid(
            "image buffer",
            format!("{len} bytes do not hold a {w}x{h} image with {channels} channels"),
        ));
    }
    Ok(())
}

/// Writes a PNG atomically: encodes to a temporary file in the same folder, then renames it.
/// Refuses to replace an existing file unless `overwrite` (the CLI's `--force`).
pub fn save_png(
    path: &Path,
    pixels: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    overwrite: bool,
) -> Result<()> {
    check_len(pixels.len(), w, h, channels)?;
    let color = if channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    let mut buf = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut buf),
        pixels,
        w as u32,
        h as u32,
        color,
    )
    .map_err(|e| Error::Write {
        path: path.into(),
        msg: format!("PNG encoding failed: {e}"),
    })?;
    write_atomic(path, &buf, overwrite)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let werr = |msg: String| Error::Write {
        path: path.into(),
        msg,
    };
    if path.exists() && !overwrite {
        return Err(werr(
            "file exists; pass --force to overwrite it or choose another path".into(),
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(werr(format!(
            "folder {} does not exist; create it first",
            dir.display()
        )));
    }
    let name = path
        .file_name()
        .ok_or_else(|| werr("not a file path".into()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(werr(format!("{e} (is the folder writable?)")));
    }
    Ok(())
}

/// Tiles equally sized images into a grid with `cols` columns (a 2-pixel black border between
/// tiles) and writes it as one PNG.
pub fn save_grid(
    path: &Path,
    images: &[Vec<u8>],
    w: usize,
    h: usize,
    channels: usize,
    cols: usize,
    overwrite: bool,
) -> Result<()> {
    let (pixels, gw, gh) = make_grid(images, w, h, channels, cols)?;
    save_png(path, &pixels, gw, gh, channels, overwrite)
}

/// Tiles images into one buffer (see [`save_grid`]); returns `(pixels, width, height)`.
pub fn make_grid(
    images: &[Vec<u8>],
    w: usize,
    h: usize,
    channels: usize,
    cols: usize,
) -> Result<(Vec<u8>, usize, usize)> {
    const PAD: usize = 2;
    if images.is_empty() || cols == 0 {
        return Err(Error::invalid(
            "image grid",
            "needs at least one image and one column",
        ));
    }
    for im in images {
        check_len(im.len(), w, h, channels)?;
    }
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let gw = cols * w + (cols + 1) * PAD;
    let gh = rows * h + (rows + 1) * PAD;
    let mut out = vec![0u8; gw * gh * channels];
    for (i, im) in images.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        let (x0, y0) = (PAD + c * (w + PAD), PAD + r * (h + PAD));
        for y in 0..h {
            let dst = ((y0 + y) * gw + x0) * channels;
            out[dst..dst + w * channels]
                .copy_from_slice(&im[y * w * channels..(y + 1) * w * channels]);
        }
    }
    Ok((out, gw, gh))
}

/// Token grids of one or more images: `{"grid": [h, w], "images": [[code, ...], ...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFile {
    /// Grid height and width in tokens.
    pub grid: [usize; 2],
    /// Raster-order codes of every image, `grid[0] * grid[1]` each.
    pub images: Vec<Vec<u32>>,
}

impl TokenFile {
    /// Checks that every image fills the grid and every code is below `codebook_size`.
    pub fn validate(&self, codebook_size: usize) -> Result<()> {
        let n = self.grid[0] * self.grid[1];
        if n == 0 || self.images.is_empty() {
            return Err(Error::invalid(
                "token file",
                "needs a non-empty grid and at least one image",
            ));
        }
        for (i, im) in self.images.iter().enumerate() {
            if im.len() != n {
                return Err(Error::invalid(
                    "token file",
                    format!(
                        "image {i} has {} codes, the {}x{} grid needs {n}",
                        im.len(),
                        self.grid[0],
                        self.grid[1]
                    ),
                ));
            }
            if let Some(&c) = im.iter().find(|&&c| c as usize >= codebook_size) {
                return Err(Error::invalid(
                    "token file",
                    format!("image {i} has code {c}, but the codebook has {codebook_size} entries (wrong tokenizer?)"),
                ));
            }
        }
        Ok(())
    }

    /// Reads and validates a token file.
    pub fn read(path: &Path, codebook_size: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::load(path, e.to_string()))?;
        let tf: TokenFile = serde_json::from_str(&text).map_err(|e| {
            Error::load(
                path,
                format!("not a token file ({e}); expected {{\"grid\":[h,w],\"images\":[[...]]}}"),
            )
        })?;
        tf.validate(codebook_size)
            .map_err(|e| Error::load(path, e.to_string()))?;
        Ok(tf)
    }

    /// Writes the file atomically (refusing to overwrite unless `overwrite`).
    pub fn write(&self, path: &Path, overwrite: bool) -> Result<()> {
        let text =
            serde_json::to_string(self).map_err(|e| Error::invalid("token file", e.to_string()))?;
        write_atomic(path, text.as_bytes(), overwrite)
    }

    /// The codes as a `[b, h*w]` u32 tensor.
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let n = self.grid[0] * self.grid[1];
        let flat: Vec<u32> = self.images.iter().flatten().copied().collect();
        if flat.len() != n * self.images.len() {
            return Err(Error::invalid("token file", "images do not fill the grid"));
        }
        Ok(Tensor::from_vec(flat, (self.images.len(), n), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_conversion_matches_save_image() {
        assert_eq!(value_to_u8(-2.0), 0);
        assert_eq!(value_to_u8(-1.0), 0);
        assert_eq!(value_to_u8(1.0), 255);
        assert_eq!(value_to_u8(7.0), 255);
        assert_eq!(value_to_u8(0.0), 128); // 127.5 + 0.5 = 128
        assert_eq!(value_to_u8(f32::NAN), 0);
    }

    #[test]
    fn grid_layout() -> Result<()> {
        let a = vec![10u8; 4];
        let b = vec![20u8; 4];
        let (px, gw, gh) = make_grid(&[a, b], 2, 2, 1, 2)?;
        assert_eq!((gw, gh), (2 * 2 + 3 * 2, 2 + 2 * 2));
        assert_eq!(px[2 * gw + 2], 10);
        assert_eq!(px[2 * gw + 6], 20);
        assert_eq!(px[0], 0);
        Ok(())
    }

    #[test]
    fn save_png_refuses_overwrite_and_bad_dirs() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lantern-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("a.png");
        let _ = std::fs::remove_file(&p);
        save_png(&p, &[0u8, 255, 7, 9], 2, 2, 1, false)?;
        let err = save_png(&p, &[1u8; 4], 2, 2, 1, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        save_png(&p, &[1u8; 12], 2, 2, 3, true)?;
        let back = image::open(&p).map_err(|e| Error::invalid("png", e.to_string()))?;
        assert_eq!(back.to_rgb8().into_raw(), vec![1u8; 12]);
        assert!(save_png(&dir.join("no/such/dir.png"), &[1u8; 4], 2, 2, 1, false).is_err());
        assert!(save_png(&dir.join("b.png"), &[1u8; 5], 2, 2, 1, false).is_err());
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(&dir)?.count(), 1);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn token_file_validation() {
        let tf = TokenFile {
            grid: [1, 2],
            images: vec![vec![0, 5]],
        };
        assert!(tf.validate(6).is_ok());
        assert!(tf.validate(5).is_err());
        let bad = TokenFile {
            grid: [2, 2],
            images: vec![vec![0, 1]],
        };
        assert!(bad.validate(6).is_err());
    }
}
