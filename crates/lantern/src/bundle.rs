//! A model bundle: the folder layout lantern ships and loads by default.
//!
//! ```text
//! <dir>/gpt/          config.json + model.safetensors   (LlamaGen target, required)
//! <dir>/vq/           config.json + model.safetensors   (VQ tokenizer, required)
//! <dir>/drafter/      config.json + model.safetensors   (EAGLE drafter, for speculative decoding)
//! <dir>/neighbors.safetensors                           (latent proximity table, for LANTERN)
//! <dir>/classifier/   config.json + model.safetensors   (evaluation classifier)
//! <dir>/classes.json  ["t-shirt", ...]                  (class names by id)
//! ```
//! Each part can also be given separately (official `.pt` files included) through
//! [`BundlePaths`].
use crate::accept::Neighbors;
use crate::load::{load_drafter, load_llamagen};
use crate::models::drafter::Drafter;
use crate::models::llamagen::LlamaGen;
use crate::models::vq::{VqConfig, VqModel};
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where each part of a bundle comes from.
#[derive(Debug, Clone, Default)]
pub struct BundlePaths {
    /// Bundle folder; parts not given below are looked up inside it.
    pub dir: Option<PathBuf>,
    /// Target GPT checkpoint (folder, `.safetensors` or `.pt`).
    pub gpt: Option<PathBuf>,
    /// VQ tokenizer (our folder, or an official `.pt` with `vq_config` describing it).
    pub vq: Option<PathBuf>,
    /// Drafter (folder or file).
    pub drafter: Option<PathBuf>,
    /// Proximity table (`lantern neighbors` output or an official `.npy`).
    pub neighbors: Option<PathBuf>,
}

/// Loaded models of one bundle.
pub struct ModelBundle {
    /// The target GPT.
    pub gpt: LlamaGen,
    /// The VQ tokenizer.
    pub vq: VqModel,
    /// The drafter, when one was found.
    pub drafter: Option<Drafter>,
    /// The proximity table, when one was found (or built on request).
    pub neighbors: Option<Arc<Neighbors>>,
    /// Class names by id (empty when unknown).
    pub class_names: Vec<String>,
}

impl BundlePaths {
    /// Paths of a bundle folder.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
            ..Default::default()
        }
    }

    fn part(&self, explicit: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
        explicit.clone().or_else(|| {
            self.dir
                .as_ref()
                .map(|d| d.join(name))
                .filter(|p| p.exists())
        })
    }
}

/// Loads a VQ tokenizer: our folder layout, or a `.pt` (official VQ-16 unless a `config.json`
/// beside it says otherwise).
pub fn load_vq(path: &Path, device: &Device) -> Result<VqModel> {
    if path.is_dir() {
        return VqModel::load_dir(path, device);
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "pt" | "pth" | "bin") {
        // Official VQ-16 checkpoints carry no config; they are all VQ-16, unless a
        // `config.json` (VqConfig) sits next to the file.
        let side = path.with_file_name("config.json");
        let cfg = match std::fs::read_to_string(&side) {
            Ok(text) => {
                VqConfig::from_json(&text).map_err(|e| Error::load(&side, e.to_string()))?
            }
            Err(_) => VqConfig::vq16(),
        };
        return VqModel::load_pt(path, &cfg, device);
    }
    Err(Error::load(
        path,
        "not a VQ model: pass a folder with config.json + model.safetensors or an official vq_ds16_*.pt",
    ))
}

impl ModelBundle {
    /// Loads the parts named by `paths`; the GPT runs in `dtype`, the VQ in f32.
    pub fn load(paths: &BundlePaths, dtype: DType, device: &Device) -> Result<Self> {
        let gpt_path = paths.part(&paths.gpt, "gpt").ok_or_else(|| match &paths.dir {
            Some(d) => Error::load(
                d,
                "no gpt/ model in this folder: pass --models with a model bundle or --gpt with a checkpoint",
            ),
            None => Error::invalid("model", "no target model given: pass --models DIR or --gpt FILE"),
        })?;
        let (gpt, _) = load_llamagen(&gpt_path, None, dtype, device)?;
        let vq_path = paths.part(&paths.vq, "vq").ok_or_else(|| {
            Error::invalid(
                "model",
                "no VQ tokenizer found: pass --vq (a folder or an official vq_ds16_*.pt)",
            )
        })?;
        let vq = load_vq(&vq_path, device)?;
        if vq.config().codebook_size != gpt.config().vocab_size {
            return Err(Error::invalid(
                "models",
                format!(
                    "the VQ codebook has {} codes but the GPT vocabulary has {}: use the tokenizer the GPT was trained with",
                    vq.config().codebook_size,
                    gpt.config().vocab_size
                ),
            ));
        }
        let drafter = match paths.part(&paths.drafter, "drafter") {
            Some(p) => {
                let (d, _) = load_drafter(&p, None, dtype, device)?;
                d.check_target(gpt.config())?;
                Some(d)
            }
            None => None,
        };
        let neighbors = match paths.part(&paths.neighbors, "neighbors.safetensors") {
            Some(p) => {
                let n = if p.extension().is_some_and(|e| e == "npy") {
                    Neighbors::from_npy(&p, Some(1000.min(gpt.config().vocab_size - 1)))?
                } else {
                    Neighbors::load(&p)?
                };
                let cb = vq.codebook()?.flatten_all()?.to_vec1::<f32>()?;
                let fp = crate::accept::codebook_fingerprint(&cb);
                n.check_codebook(vq.config().codebook_size, Some(fp))?;
                Some(Arc::new(n))
            }
            None => None,
        };
        let class_names = paths
            .dir
            .as_ref()
            .map(|d| d.join("classes.json"))
            .filter(|p| p.exists())
            .map(|p| -> Result<Vec<String>> {
                let text = std::fs::read_to_string(&p)?;
                serde_json::from_str(&text)
                    .map_err(|e| Error::load(&p, format!("not a JSON list of names: {e}")))
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            gpt,
            vq,
            drafter,
            neighbors,
            class_names,
        })
    }

    /// Resolves a class given by name (case-insensitive) or id, with an error that lists the
    /// valid choices.
    pub fn class_id(&self, class: &str) -> Result<u32> {
        let n = self.gpt.config().num_classes;
        if let Ok(id) = class.parse::<u32>() {
            if (id as usize) < n {
                return Ok(id);
            }
            return Err(Error::invalid(
                "class",
                format!("{id} is out of range: this model has classes 0..{}", n - 1),
            ));
        }
        let want = class.to_lowercase();
        self.class_names
            .iter()
            .position(|c| c.to_lowercase() == want)
            .map(|i| i as u32)
            .ok_or_else(|| {
                let names = if self.class_names.is_empty() {
                    format!("this model has no class names; use an id in 0..{}", n - 1)
                } else {
                    format!("choose one of: {}", self.class_names.join(", "))
                };
                Error::invalid("class", format!("unknown class `{class}`: {names}"))
            })
    }
}
