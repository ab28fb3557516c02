//! One step through the host, on this crate's CPU path: for Burn's CPU backends. On
//! flex and ndarray the values and gradients are read in place (no copy but into the
//! optimizer), an ndarray tensor in another layout copied in order first; other
//! backends give their tensor data.

// Burn 0.22 deprecates its ndarray backend (for flex); the issue this answers names it,
// and it is the CPU backend Burn's users have today.
#![allow(deprecated)]

use std::borrow::Cow;

use ::burn::backend::flex::FlexTensor;
use ::burn::backend::ndarray::NdArrayTensor;
use ::burn::backend::{Flex, NdArray};
use ::burn::tensor::{DType, Tensor, TensorData};
use half::{bf16, f16};

use crate::burn_bridge::module::{ErasedTensor, NewValue, Taken};
use crate::dtype::{split_master, GradSlice};
use crate::error::{BurnProblem, Error, Result};
use crate::optimizer::RmsProp;

/// A tensor's elements on the host: a tensor of a CPU backend kept to be viewed, or
/// data read.
enum HostValues {
    /// A contiguous f32 ndarray tensor.
    Ndarray(NdArrayTensor),
    /// A contiguous flex tensor of f32, bf16 or f16.
    Flex(FlexTensor),
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostValues {
    fn read(tensor: ErasedTensor, name: &str) -> Result<Self> {
        let backend = |e: String| Error::BurnParam {
            name: name.to_string(),
            problem: BurnProblem::Backend(e),
        };
        let as_tensor = || Tensor::<1>::from_dispatch(tensor.dispatch.clone());
        if let Ok(flex) = as_tensor().try_into_primitive::<Flex>() {
            let viewable = match flex.dtype() {
                DType::F32 => flex.as_slice::<f32>().is_some(),
                DType::BF16 => flex.as_slice::<bf16>().is_some(),
                DType::F16 => flex.as_slice::<f16>().is_some(),
                _ => false,
            };
            if viewable {
                return Ok(HostValues::Flex(flex));
            }
        }
        if let Ok(NdArrayTensor::F32(storage)) = as_tensor().try_into_primitive::<NdArray>() {
            let view = storage.view();
            if view.is_standard_layout() {
                return Ok(HostValues::Ndarray(NdArrayTensor::F32(storage)));
            }
            // Burn's backward leaves some gradients in another layout (a convolution's
            // weight, permuted): copied in order by ndarray's `assign`, a strided loop per
            // row, where Burn's `into_data` steps element by element through dynamic
            // indices (200 us for a 3x3 convolution's 9,216 weights).
            let mut standard = ndarray::ArrayD::<f32>::zeros(view.raw_dim());
            standard.assign(&view);
            return Ok(HostValues::F32(standard.into_raw_vec_and_offset().0));
        }
        let data: TensorData = tensor
            .into_tensor::<1>()
            .try_into_data()
            .map_err(|e| backend(e.to_string()))?;
        let read = match data.dtype() {
            DType::BF16 => data.try_into_vec::<bf16>().map(HostValues::Bf16),
            DType::F16 => data.try_into_vec::<f16>().map(HostValues::F16),
            _ => data.try_into_vec::<f32>().map(HostValues::F32),
        };
        read.map_err(|e| backend(format!("{e:?}")))
    }

    /// The elements in their own type.
    fn slice(&self) -> GradSlice<'_> {
        match self {
            // `read` keeps standard layouts only: one slice each
            HostValues::Ndarray(NdArrayTensor::F32(storage)) => GradSlice::F32(
                storage
                    .view()
                    .to_slice()
                    .expect("read keeps standard layouts only"),
            ),
            HostValues::Ndarray(other) => {
                unreachable!("read keeps f32 ndarray tensors only, not {other:?}")
            }
            HostValues::Flex(flex) => match flex.dtype() {
                DType::BF16 => GradSlice::Bf16(flex.as_slice().expect("checked by read")),
                DType::F16 => GradSlice::F16(flex.as_slice().expect("checked by read")),
                _ => GradSlice::F32(flex.as_slice().expect("checked by read")),
            },
            HostValues::F32(v) => GradSlice::F32(v),
            HostValues::Bf16(v) => GradSlice::Bf16(v),
            HostValues::F16(v) => GradSlice::F16(v),
        }
    }

    /// The elements as f32 (16-bit ones upcast, exactly).
    fn f32s(&self) -> Cow<'_, [f32]> {
        match self.slice() {
            GradSlice::F32(v) => Cow::Borrowed(v),
            GradSlice::Bf16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            GradSlice::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }
}

/// Whether `module` (bf16) holds what the f32 `masters` round to as bf16 parameters with
/// remainders ([`split_master`]): then the module's values are the masters' and the
/// masters stay; writing the bf16 values would drop their remainders.
fn holds_rounded_masters(module: &[bf16], masters: &[f32]) -> bool {
    module.len() == masters.len()
        && module
            .iter()
            .zip(masters)
            .all(|(b, &m)| b.to_bits() == split_master(m).0)
}

/// One step through the host: values and gradients read, this crate's CPU path, the
/// new values (of the parameters `written` marks) as tensor data, in the module's
/// element type `dtype`, for Burn to upload.
pub(crate) fn step(
    optimizer: &mut RmsProp,
    dtype: DType,
    written: &[bool],
    taken: Vec<Taken>,
) -> Result<Vec<Option<NewValue>>> {
    let remainders = optimizer.precision().param_remainders;
    let mut values = Vec::with_capacity(taken.len());
    let mut grads = Vec::with_capacity(taken.len());
    let mut shapes = Vec::with_capacity(taken.len());
    for t in taken {
        values.push(HostValues::read(t.value, &t.name)?);
        grads.push(match t.grad {
            Some(g) => Some(HostValues::read(g, &t.name)?),
            None => None,
        });
        shapes.push((t.shape, t.device));
    }
    // The module's values are the truth: Burn's code may have changed them. Behind bf16
    // parameters with remainders, values that are the masters rounded keep the masters.
    for (i, v) in values.iter().enumerate() {
        if let (true, GradSlice::Bf16(module)) = (remainders, v.slice()) {
            if holds_rounded_masters(module, &optimizer.variable(i)?) {
                continue;
            }
        }
        optimizer.set_variable(i, &v.f32s())?;
    }
    let slices: Vec<Option<GradSlice<'_>>> = grads
        .iter()
        .map(|g| g.as_ref().map(HostValues::slice))
        .collect();
    optimizer.apply_grad_slices(&slices)?;
    let mut new = Vec::with_capacity(values.len());
    for (i, (shape, device)) in shapes.into_iter().enumerate() {
        if !written[i] {
            new.push(None);
            continue;
        }
        let values = optimizer.variable(i)?;
        let data = match dtype {
            DType::BF16 if remainders => TensorData::new(
                values
                    .iter()
                    .map(|&m| bf16::from_bits(split_master(m).0))
                    .collect::<Vec<_>>(),
                shape,
            ),
            // the optimizer's 16-bit parameters, exactly
            DType::BF16 => TensorData::new(
                values
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect::<Vec<_>>(),
                shape,
            ),
            DType::F16 => TensorData::new(
                values.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
                shape,
            ),
            _ => TensorData::new(values, shape),
        };
        new.push(Some(NewValue::Data(data, device)));
    }
    Ok(new)
}
