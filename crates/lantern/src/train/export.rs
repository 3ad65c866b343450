//! Saving trained variables in the compact form we ship.
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Saves every variable of `varmap` as f16 safetensors at `path`, writing a temporary file
/// first and renaming it, so a crash never leaves a partial file.
pub fn save_varmap_f16(varmap: &VarMap, path: &Path) -> Result<()> {
    save_tensors(varmap, path, DType::F16)
}

/// Saves every variable of `varmap` in `dtype` at `path` (atomically, via a temporary file).
pub fn save_tensors(varmap: &VarMap, path: &Path, dtype: DType) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("variables", "lock poisoned"))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in data.iter() {
        tensors.insert(
            name.clone(),
            var.as_tensor()
                .to_dtype(dtype)?
                .to_device(&candle_core::Device::Cpu)?,
        );
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(())
}
