//! Random weights at real shapes without a checkpoint: a [`VarBuilder`] whose backend creates
//! every requested tensor directly on the device from the loader's init hint (Kaiming normal for
//! linears, N(0, 1) for embeddings, ones for norms, ...). Timing does not depend on the values.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Backend of [`random_var_builder`]: ignores names, honours shapes and init hints.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, _name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        // cuRAND has no half-precision generators: draw in f32, then convert.
        let gen = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        // `detach` drops the `Var` flag: the models must see plain (inference) tensors.
        h.var(s, gen, dev)?.as_detached_tensor().to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!(
            "random weights: `{name}` was requested without a shape; load it with a shape"
        )
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A builder that hands out freshly initialised random tensors of `dtype` on `device`.
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_dtypes_and_hints() -> Result<()> {
        let vb = random_var_builder(DType::BF16, &Device::Cpu);
        let w = vb.get_with_hints((3, 4), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        assert_eq!(w.dims(), [3, 4]);
        assert_eq!(w.dtype(), DType::BF16);
        assert!(!w.is_variable());
        let ones = vb.get_with_hints(5, "n", Init::Const(1.0))?;
        let s = ones.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(s, 5.0);
        // Random, not constant.
        let r = vb
            .get_with_hints(
                64,
                "r",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?
            .to_dtype(DType::F32)?;
        let var = r.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!(var > 0.3 && var < 3.0, "variance {var}");
        assert!(vb.get_unchecked("x").is_err());
        Ok(())
    }
}
