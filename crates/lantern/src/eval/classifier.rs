//! A small CNN classifier used only for evaluation: class accuracy of generated images and
//! classifier-FID on its penultimate (128-d) features.
use crate::data::ImageDataset;
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Classifier architecture (saved as `config.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassifierConfig {
    /// Input side in pixels (images are centre-cropped or padded to it).
    pub image_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Channels of the three conv layers.
    pub channels: [usize; 3],
    /// Width of the penultimate feature layer.
    pub feature_dim: usize,
    /// Class names by label.
    pub class_names: Vec<String>,
}

impl ClassifierConfig {
    /// The configuration used for Fashion-MNIST.
    pub fn fashion_mnist() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            num_classes: 10,
            channels: [16, 32, 64],
            feature_dim: 128,
            class_names: crate::data::FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// The evaluation CNN: conv-relu, conv-relu-pool, conv-relu-pool, fc (features), fc (logits).
pub struct Classifier {
    c1: Conv2d,
    c2: Conv2d,
    c3: Conv2d,
    fc1: Linear,
    fc2: Linear,
    cfg: ClassifierConfig,
}

impl Classifier {
    /// Builds the network from a VarBuilder (a checkpoint or a fresh VarMap).
    pub fn load(vb: VarBuilder, cfg: &ClassifierConfig) -> candle_core::Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let [a, b, c] = cfg.channels;
        let side = cfg.image_size / 4;
        Ok(Self {
            c1: conv2d(cfg.in_channels, a, 3, pad, vb.pp("c1"))?,
            c2: conv2d(a, b, 3, pad, vb.pp("c2"))?,
            c3: conv2d(b, c, 3, pad, vb.pp("c3"))?,
            fc1: linear(c * side * side, cfg.feature_dim, vb.pp("fc1"))?,
            fc2: linear(cfg.feature_dim, cfg.num_classes, vb.pp("fc2"))?,
            cfg: cfg.clone(),
        })
    }

    /// Loads a classifier folder (`config.json` + `model.safetensors`).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::load(&cfg_path, format!("{e} (expected a classifier folder)")))?;
        let cfg: ClassifierConfig = serde_json::from_str(&text)
            .map_err(|e| Error::load(&cfg_path, format!("not a classifier config: {e}")))?;
        let w = dir.join("model.safetensors");
        // SAFETY: read-only mapping of a file we do not modify.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&w], DType::F32, device) }
            .map_err(|e| Error::load(&w, e.to_string()))?;
        Classifier::load(vb, &cfg)
            .map_err(|e| Error::load(&w, format!("not a classifier checkpoint: {e}")))
    }

    /// The configuration.
    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// # Shapes
    /// - `xs`: `[b, c, s, s]` f32 in [-1, 1] · returns (features `[b, feature_dim]`, logits `[b, classes]`)
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.c1.forward(xs)?.relu()?;
        let h = self.c2.forward(&h)?.relu()?.max_pool2d(2)?;
        let h = self.c3.forward(&h)?.relu()?.max_pool2d(2)?;
        let feats = self.fc1.forward(&h.flatten_from(1)?)?.relu()?;
        let logits = self.fc2.forward(&feats)?;
        Ok((feats, logits))
    }

    /// Features and predicted labels of a dataset (images centre-cropped / padded to the
    /// classifier's size), in batches.
    pub fn predict(&self, data: &ImageDataset, device: &Device) -> Result<(Vec<f32>, Vec<u32>)> {
        let mut feats = Vec::new();
        let mut labels = Vec::new();
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(256) {
            let x = batch_tensor(data, chunk, self.cfg.image_size, device)?;
            let (f, l) = self.forward(&x)?;
            feats.extend(f.flatten_all()?.to_vec1::<f32>()?);
            labels.extend(l.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        Ok((feats, labels))
    }
}

/// Turns images of a dataset into a `[b, c, s, s]` tensor in [-1, 1], centre-cropping or
/// zero-padding (value -1, the background) each side to `size`.
pub fn batch_tensor(
    data: &ImageDataset,
    idx: &[usize],
    size: usize,
    device: &Device,
) -> Result<Tensor> {
    let (h, w, c) = (data.height, data.width, data.channels);
    let mut out = vec![-1f32; idx.len() * c * size * size];
    let (oy, ox) = (h as isize - size as isize, w as isize - size as isize);
    for (b, &i) in idx.iter().enumerate() {
        let img = data.image(i);
        for y in 0..size {
            let sy = y as isize + oy / 2;
            if sy < 0 || sy >= h as isize {
                continue;
            }
            for x in 0..size {
                let sx = x as isize + ox / 2;
                if sx < 0 || sx >= w as isize {
                    continue;
                }
                for ch in 0..c {
                    let v = img[(sy as usize * w + sx as usize) * c + ch] as f32;
                    out[((b * c + ch) * size + y) * size + x] = v / 127.5 - 1.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (idx.len(), c, size, size), device)?)
}

/// Training settings for the classifier.
#[derive(Debug, Clone)]
pub struct ClassifierTrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Shuffling seed.
    pub seed: u64,
}

impl Default for ClassifierTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 128,
            lr: 2e-3,
            seed: 0,
        }
    }
}

/// Trains a fresh classifier; `progress(step, total, loss)` is called every step. Returns the
/// model's variables (save with [`VarMap::save`]) and the classifier.
pub fn train_classifier(
    cfg: &ClassifierConfig,
    tcfg: &ClassifierTrainConfig,
    data: &ImageDataset,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize, f32),
) -> Result<(VarMap, Classifier)> {
    if data.is_empty() {
        return Err(Error::invalid("training data", "no images"));
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Classifier::load(vb, cfg)?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: tcfg.lr,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(tcfg.seed);
    let steps_per_epoch = data.len().div_ceil(tcfg.batch_size);
    let total = steps_per_epoch * tcfg.epochs;
    let mut step = 0;
    for _ in 0..tcfg.epochs {
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut rng);
        for chunk in order.chunks(tcfg.batch_size) {
            // cosine decay of the learning rate
            let lr =
                tcfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            opt.set_learning_rate(lr);
            let x = batch_tensor(data, chunk, cfg.image_size, device)?;
            let y: Vec<u32> = chunk.iter().map(|&i| data.labels[i]).collect();
            let y = Tensor::new(y.as_slice(), device)?;
            let (_, logits) = model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
            step += 1;
            progress(step, total, loss.to_scalar::<f32>()?);
        }
    }
    Ok((varmap, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_and_pad_keep_the_centre() {
        let data = ImageDataset {
            images: (0..16).map(|v| v as u8).collect(),
            labels: vec![0],
            height: 4,
            width: 4,
            channels: 1,
            class_names: vec!["a".into()],
        };
        let t = batch_tensor(&data, &[0], 2, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = [5.0f32, 6.0, 9.0, 10.0]
            .iter()
            .map(|x| x / 127.5 - 1.0)
            .collect();
        assert_eq!(v, want);
        let t = batch_tensor(&data, &[0], 6, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[6 + 1], -1.0); // (1,1) -> source (0,0) = 0 -> -1.0 too
        assert_eq!(v[2 * 6 + 2], 5.0 / 127.5 - 1.0);
    }
}
