//! Checkpoint readers: PyTorch zip pickles (`.pt`/`.pth`/`.bin`, read with candle's
//! non-executing pickle parser), safetensors (mmap) and HF-style folders, all exposed as a
//! [`VarBuilder`] under the canonical (original LlamaGen) names, plus a [`LoadReport`].
pub mod args;
pub mod inspect;
pub mod keys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub use inspect::{inspect, CheckpointInfo, CheckpointKind};
use keys::Source;

use crate::models::drafter::{Drafter, DrafterConfig};
use crate::models::llamagen::{Config, LlamaGen};
use crate::{Error, Result};

/// Container format of a checkpoint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// `torch.save` zip archive with a pickled (state) dict.
    TorchPickle,
    /// safetensors.
    Safetensors,
}

/// What [`open_weights`] found.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The weights file that was opened.
    pub path: PathBuf,
    pub format: CheckpointFormat,
    /// The dict key holding the state dict (`model`, `module`, ...), `None` for a bare one.
    pub state_key: Option<String>,
    /// Stored tensors (wrapper prefixes removed): shape and stored dtype.
    pub tensors: BTreeMap<String, (Vec<usize>, DType)>,
    /// Prefix removed from every stored key (e.g. `module.`).
    pub stripped_prefix: Option<String>,
    /// `config.json` next to the weights, if any.
    pub config_json: Option<serde_json::Value>,
    /// Scalar training arguments stored in a LlamaGen `.pt` (`image_size`, `gpt_model`, ...).
    pub args: BTreeMap<String, serde_json::Value>,
}

impl LoadReport {
    /// Whether a stored tensor of this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Shape a canonical name resolves to (fused `wqkv` = concatenated rows).
    pub fn canonical_shape(&self, name: &str) -> Option<Vec<usize>> {
        match keys::resolve(name, |n| self.has(n))? {
            Source::Direct(n) => self.tensors.get(&n).map(|t| t.0.clone()),
            Source::Concat(v) => {
                let mut shape = self.tensors.get(&v[0])?.0.clone();
                for n in &v[1..] {
                    *shape.first_mut()? += *self.tensors.get(n)?.0.first()?;
                }
                Some(shape)
            }
        }
    }

    /// Dtype of most stored values.
    pub fn stored_dtype(&self) -> Option<DType> {
        let mut count: BTreeMap<String, (usize, DType)> = BTreeMap::new();
        for (shape, dt) in self.tensors.values() {
            let e = count.entry(format!("{dt:?}")).or_insert((0, *dt));
            e.0 += shape.iter().product::<usize>();
        }
        count.into_values().max_by_key(|c| c.0).map(|c| c.1)
    }

    /// Checks that every expected canonical tensor exists with the expected shape.
    pub fn check_shapes(&self, expected: &[(String, Vec<usize>)], what: &str) -> Result<()> {
        for (name, shape) in expected {
            match self.canonical_shape(name) {
                None => {
                    return Err(Error::load(
                        &self.path,
                        format!(
                            "tensor `{name}` is missing: this is not a {what} checkpoint ({}); run `lantern inspect` on it",
                            inspect::classify(self)
                        ),
                    ))
                }
                Some(actual) if &actual != shape => {
                    return Err(Error::Shape {
                        name: name.clone(),
                        expected: shape.clone(),
                        actual,
                        hint: format!("the {what} config does not match {}; pick the matching preset or config.json", self.path.display()),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

enum Store {
    Pth(PthTensors),
    Safetensors(MmapedSafetensors),
}

/// A [`SimpleBackend`] serving canonical names from a stored checkpoint.
struct Renamed {
    store: Store,
    report: LoadReport,
}

impl Renamed {
    fn raw(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let full = match &self.report.stripped_prefix {
            Some(p) => format!("{p}{name}"),
            None => name.to_string(),
        };
        match &self.store {
            Store::Pth(p) => p
                .get(&full)?
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("tensor {name} vanished from the file"))
                })?
                .to_device(dev),
            Store::Safetensors(s) => s.load(&full, dev),
        }
    }

    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = match keys::resolve(name, |n| self.report.has(n)) {
            None => {
                return Err(candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })
            }
            Some(Source::Direct(n)) => self.raw(&n, dev)?,
            Some(Source::Concat(v)) => {
                let parts = v
                    .iter()
                    .map(|n| self.raw(n, dev))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
        };
        t.to_dtype(dtype)
    }
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.fetch(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        keys::resolve(name, |n| self.report.has(n)).is_some()
    }
}

/// State-dict keys tried, in order, when the pickle's top level is not itself a state dict.
pub const STATE_KEYS: [&str; 4] = ["model", "module", "state_dict", "ema"];

fn weights_file(path: &Path) -> Result<(PathBuf, Option<serde_json::Value>)> {
    if !path.exists() {
        return Err(Error::load(path, "no such file or folder; check the path"));
    }
    if !path.is_dir() {
        return Ok((path.to_path_buf(), None));
    }
    let cfg_path = path.join("config.json");
    let config_json = if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::load(&cfg_path, e.to_string()))?;
        Some(serde_json::from_str(&text).map_err(|e| {
            Error::load(&cfg_path, format!("not valid JSON ({e}); fix config.json"))
        })?)
    } else {
        None
    };
    for f in [
        "model.safetensors",
        "pytorch_model.bin",
        "model.pt",
        "consolidated.pth",
    ] {
        if path.join(f).is_file() {
            return Ok((path.join(f), config_json));
        }
    }
    Err(Error::load(
        path,
        "folder has no model.safetensors or pytorch_model.bin; point at the weights file",
    ))
}

fn open_pickle(path: &Path) -> Result<(PthTensors, Option<String>)> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::load(path, e.to_string()))?;
        f.read_exact(&mut magic)
            .map_err(|_| Error::load(path, "file is empty or truncated; download it again"))?;
    }
    if &magic != b"PK\x03\x04" {
        return Err(Error::load(
            path,
            "not a zip-format torch.save file (legacy or corrupt); re-save it with torch>=1.6 or use safetensors",
        ));
    }
    let bad = |e: candle_core::Error| {
        Error::load(
            path,
            format!(
                "unreadable PyTorch checkpoint ({}); the file may be truncated, download it again",
                one_line(&e)
            ),
        )
    };
    let top = PthTensors::new(path, None).map_err(bad)?;
    if !top.tensor_infos().is_empty() {
        return Ok((top, None));
    }
    for key in STATE_KEYS {
        if let Ok(p) = PthTensors::new(path, Some(key)) {
            if !p.tensor_infos().is_empty() {
                return Ok((p, Some(key.to_string())));
            }
        }
    }
    Err(Error::load(
        path,
        "no tensors found (expected a state dict, or a dict with a model/module/state_dict/ema entry)",
    ))
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// Opens a checkpoint (`.pt`/`.pth`/`.bin` zip pickle, `.safetensors`, or a folder with
/// `config.json` + weights) as a [`VarBuilder`] serving canonical names in `dtype` on `device`.
/// Nothing is loaded until a tensor is requested; nothing in the pickle is executed.
pub fn open_weights(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, LoadReport)> {
    let (file, config_json) = weights_file(path)?;
    let is_st = file.extension().is_some_and(|e| e == "safetensors");
    let (store, format, state_key, mut tensors) = if is_st {
        // SAFETY: the file is memory-mapped read-only; it must not change while loaded.
        let st = unsafe { MmapedSafetensors::new(&file) }.map_err(|e| {
            Error::load(
                &file,
                format!(
                    "unreadable safetensors ({}); the file may be truncated",
                    one_line(&e)
                ),
            )
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dt = DType::try_from(view.dtype()).map_err(|e| Error::load(&file, one_line(&e)))?;
            tensors.insert(name, (view.shape().to_vec(), dt));
        }
        (
            Store::Safetensors(st),
            CheckpointFormat::Safetensors,
            None,
            tensors,
        )
    } else {
        let (p, key) = open_pickle(&file)?;
        let tensors = p
            .tensor_infos()
            .iter()
            .map(|(n, i)| (n.clone(), (i.layout.dims().to_vec(), i.dtype)))
            .collect();
        (Store::Pth(p), CheckpointFormat::TorchPickle, key, tensors)
    };
    let mut stripped_prefix = None;
    for p in keys::WRAPPER_PREFIXES {
        if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with(p)) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k[p.len()..].to_string(), v))
                .collect();
            stripped_prefix = Some(p.to_string());
            break;
        }
    }
    let args = match format {
        CheckpointFormat::TorchPickle => args::read_checkpoint_args(&file),
        CheckpointFormat::Safetensors => BTreeMap::new(),
    };
    let report = LoadReport {
        args,
        path: file,
        format,
        state_key,
        tensors,
        stripped_prefix,
        config_json,
    };
    let backend = Renamed {
        store,
        report: report.clone(),
    };
    Ok((
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        report,
    ))
}

/// Opens a LlamaGen checkpoint, checks its kind and every tensor shape against `cfg` (or the
/// config implied by `config.json` / the tensor shapes when `None`), and loads the model.
pub fn load_llamagen(
    path: &Path,
    cfg: Option<&Config>,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaGen, LoadReport)> {
    let (vb, report) = open_weights(path, dtype, device)?;
    let kind = inspect::classify(&report);
    if !matches!(kind, CheckpointKind::LlamaGen { .. }) {
        return Err(Error::load(
            &report.path,
            format!("found {kind} weights, not a LlamaGen GPT; pass the GPT checkpoint"),
        ));
    }
    let cfg = match cfg {
        Some(c) => c.clone(),
        None => inspect::implied_config(&report).map_err(|m| Error::load(&report.path, m))?,
    };
    cfg.validate()?;
    report.check_shapes(&LlamaGen::expected_tensors(&cfg), "LlamaGen")?;
    let model = LlamaGen::load(vb, &cfg).map_err(|e| Error::load(&report.path, one_line(&e)))?;
    Ok((model, report))
}

/// Opens a drafter folder (`config.json` + `pytorch_model.bin` or `model.safetensors`) or a
/// weights file with an explicit `cfg`, checks its tensors and loads it.
pub fn load_drafter(
    path: &Path,
    cfg: Option<&DrafterConfig>,
    dtype: DType,
    device: &Device,
) -> Result<(Drafter, LoadReport)> {
    let (vb, report) = open_weights(path, dtype, device)?;
    let cfg = match (cfg, &report.config_json) {
        (Some(c), _) => c.clone(),
        (None, Some(v)) => DrafterConfig::from_hf_value(v).map_err(|m| Error::load(path, m))?,
        (None, None) => {
            return Err(Error::load(
                path,
                "no config.json beside the drafter weights; pass the drafter folder",
            ))
        }
    };
    if !matches!(inspect::classify(&report), CheckpointKind::Drafter) {
        return Err(Error::load(
            &report.path,
            format!(
                "found {} weights, not an EAGLE drafter; pass the drafter folder",
                inspect::classify(&report)
            ),
        ));
    }
    report.check_shapes(&cfg.expected_tensors(), "drafter")?;
    let model = Drafter::load(vb, &cfg).map_err(|e| Error::load(&report.path, one_line(&e)))?;
    Ok((model, report))
}
