//! Reader for a folder of images with one sub-folder per class.
//!
//! Only PNG files are read (the workspace builds the `image` crate with its `png` feature
//! alone); other files are skipped. Convert JPEGs first, e.g. `mogrify -format png *.jpg`.
use super::ImageDataset;
use crate::{Error, Result};
use image::imageops::FilterType;
use std::path::{Path, PathBuf};

/// Loads every PNG under `dir/<class>/`, resized to `size x size` (Catmull-Rom), as grey
/// (`channels = 1`) or RGB (`channels = 3`). Classes are the sub-folder names in sorted order;
/// files within a class are read in sorted order.
pub fn image_folder(dir: &Path, size: usize, channels: usize) -> Result<ImageDataset> {
    if !(channels == 1 || channels == 3) {
        return Err(Error::invalid(
            "channels",
            format!("{channels}; use 1 (grey) or 3 (RGB)"),
        ));
    }
    if size == 0 {
        return Err(Error::invalid("image size", "must be > 0"));
    }
    let classes = sorted_entries(dir, |p| p.is_dir()).map_err(|e| {
        Error::load(
            dir,
            format!("{e} (expected a folder with one sub-folder of PNGs per class)"),
        )
    })?;
    if classes.is_empty() {
        return Err(Error::load(
            dir,
            "no class sub-folders (expected dir/<class>/*.png)",
        ));
    }
    let mut ds = ImageDataset {
        images: Vec::new(),
        labels: Vec::new(),
        height: size,
        width: size,
        channels,
        class_names: Vec::new(),
    };
    for (label, class_dir) in classes.iter().enumerate() {
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ds.class_names.push(name);
        let files = sorted_entries(class_dir, |p| {
            p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
        })
        .map_err(|e| Error::load(class_dir, e.to_string()))?;
        for f in files {
            let px = read_resized(&f, size, channels)?;
            ds.images.extend_from_slice(&px);
            ds.labels.push(label as u32);
        }
    }
    if ds.is_empty() {
        return Err(Error::load(dir, "no PNG images in any class sub-folder"));
    }
    Ok(ds)
}

/// Side of the first PNG under `dir/<class>/` (sorted order), which must be square: read a
/// folder at its own resolution with `image_folder(dir, image_folder_side(dir)?, c)` (e.g.
/// generated images, whose evaluation must not rescale them).
pub fn image_folder_side(dir: &Path) -> Result<usize> {
    let classes = sorted_entries(dir, |p| p.is_dir()).map_err(|e| {
        Error::load(
            dir,
            format!("{e} (expected a folder with one sub-folder of PNGs per class)"),
        )
    })?;
    for class_dir in &classes {
        let files = sorted_entries(class_dir, |p| {
            p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
        })
        .map_err(|e| Error::load(class_dir, e.to_string()))?;
        if let Some(f) = files.first() {
            let (w, h) = image::image_dimensions(f)
                .map_err(|e| Error::load(f, format!("unreadable image: {e}")))?;
            if w != h {
                return Err(Error::load(
                    f,
                    format!("{w}x{h} is not square; give square images"),
                ));
            }
            return Ok(w as usize);
        }
    }
    Err(Error::load(dir, "no PNG images in any class sub-folder"))
}

fn sorted_entries(dir: &Path, keep: impl Fn(&Path) -> bool) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| keep(p))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads one image and returns its `size x size x channels` bytes.
fn read_resized(path: &Path, size: usize, channels: usize) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::load(path, e.to_string()))?
        .decode()
        .map_err(|e| Error::load(path, format!("unreadable image: {e}")))?;
    let s = size as u32;
    let same = img.width() == s && img.height() == s;
    Ok(if channels == 1 {
        let g = img.to_luma8();
        if same {
            g.into_raw()
        } else {
            image::imageops::resize(&g, s, s, FilterType::CatmullRom).into_raw()
        }
    } else {
        let g = img.to_rgb8();
        if same {
            g.into_raw()
        } else {
            image::imageops::resize(&g, s, s, FilterType::CatmullRom).into_raw()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_classes_and_resizes() -> Result<()> {
        let root = std::env::temp_dir().join(format!("lantern-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (class, v) in [("b_cls", 200u8), ("a_cls", 50u8)] {
            std::fs::create_dir_all(root.join(class))?;
            let px = vec![v; 4 * 4 * 3];
            crate::image::save_png(&root.join(class).join("x.png"), &px, 4, 4, 3, false)?;
        }
        std::fs::write(root.join("a_cls").join("bad.png"), b"not a png")?;
        let err = image_folder(&root, 2, 1).unwrap_err().to_string();
        assert!(err.contains("bad.png"), "{err}");
        std::fs::remove_file(root.join("a_cls").join("bad.png"))?;
        let ds = image_folder(&root, 2, 1)?;
        assert_eq!(ds.class_names, vec!["a_cls", "b_cls"]);
        assert_eq!(ds.labels, vec![0, 1]);
        assert_eq!(ds.image_len(), 4);
        assert!(ds.image(0).iter().all(|&p| p.abs_diff(50) <= 1));
        assert!(ds.image(1).iter().all(|&p| p.abs_diff(200) <= 1));
        assert!(image_folder(&root.join("missing"), 2, 1).is_err());
        assert_eq!(image_folder_side(&root)?, 4);
        assert!(image_folder_side(&root.join("missing")).is_err());
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }
}
