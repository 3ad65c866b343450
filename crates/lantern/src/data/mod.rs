//! Training and evaluation data: Fashion-MNIST (IDX files) and folders of images, one
//! sub-folder per class.
pub mod folder;
pub mod idx;
pub mod tokens;

pub use folder::{image_folder, image_folder_side};
pub use idx::{fashion_mnist, Split};
pub use tokens::TokenDataset;

/// Where Debian's `dataset-fashion-mnist` package installs the data.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST class names, by label index.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

/// An in-memory image dataset: `n` images of `height x width x channels` u8 pixels (HWC,
/// row-major, image after image) with class labels.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    /// Pixel bytes, `n * height * width * channels` long.
    pub images: Vec<u8>,
    /// Class label of every image.
    pub labels: Vec<u32>,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Channels per pixel (1 grey, 3 RGB).
    pub channels: usize,
    /// Class names by label.
    pub class_names: Vec<String>,
}

impl ImageDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The first `n` images (or all when fewer).
    pub fn take(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        ImageDataset {
            images: self.images[..n * self.image_len()].to_vec(),
            labels: self.labels[..n].to_vec(),
            class_names: self.class_names.clone(),
            ..*self
        }
    }
}
