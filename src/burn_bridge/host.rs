//! One step through the host, on this crate's CPU path: for Burn's CPU backends. On
//! ndarray the values and gradients are read in place (no copy but into the optimizer);
//! other backends give their tensor data.

// Burn 0.22 deprecates its ndarray backend (for flex); the issue this answers names it,
// and it is the CPU backend Burn's users have today.
#![allow(deprecated)]

use std::borrow::Cow;

use ::burn::backend::ndarray::NdArrayTensor;
use ::burn::backend::NdArray;
use ::burn::tensor::{Tensor, TensorData};

use crate::burn_bridge::module::{ErasedTensor, NewValue, Taken};
use crate::error::{BurnProblem, Error, Result};
use crate::optimizer::RmsProp;

/// A tensor's f32 elements on the host: an ndarray tensor kept to be viewed, or data read.
enum HostValues {
    Ndarray(NdArrayTensor),
    Read(Vec<f32>),
}

impl HostValues {
    fn read(tensor: ErasedTensor, name: &str) -> Result<Self> {
        let backend = |e: String| Error::BurnParam {
            name: name.to_string(),
            problem: BurnProblem::Backend(e),
        };
        let as_ndarray =
            Tensor::<1>::from_dispatch(tensor.dispatch.clone()).try_into_primitive::<NdArray>();
        if let Ok(NdArrayTensor::F32(storage)) = &as_ndarray {
            if storage.view().is_standard_layout() {
                return Ok(HostValues::Ndarray(as_ndarray.expect("matched Ok")));
            }
        }
        let data = tensor
            .into_tensor::<1>()
            .try_into_data()
            .map_err(|e| backend(e.to_string()))?;
        data.try_into_vec::<f32>()
            .map(HostValues::Read)
            .map_err(|e| backend(format!("{e:?}")))
    }

    fn values(&self) -> Cow<'_, [f32]> {
        match self {
            // `read` kept only contiguous f32 ndarray tensors.
            HostValues::Ndarray(NdArrayTensor::F32(storage)) => match storage.view().to_slice() {
                Some(slice) => Cow::Borrowed(slice),
                None => Cow::Owned(storage.view().iter().copied().collect()),
            },
            HostValues::Ndarray(other) => unreachable!("read keeps f32 only, not {other:?}"),
            HostValues::Read(v) => Cow::Borrowed(v),
        }
    }
}

/// One step through the host: values and gradients read, this crate's CPU path, the
/// new values (of the parameters `written` marks) as tensor data for Burn to upload.
pub(crate) fn step(
    optimizer: &mut RmsProp,
    written: &[bool],
    taken: Vec<Taken>,
) -> Result<Vec<Option<NewValue>>> {
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
    // The module's values are the truth: Burn's code may have changed them.
    for (i, v) in values.iter().enumerate() {
        optimizer.set_variable(i, &v.values())?;
    }
    let grads: Vec<Option<Cow<'_, [f32]>>> = grads
        .iter()
        .map(|g| g.as_ref().map(HostValues::values))
        .collect();
    let refs: Vec<Option<&[f32]>> = grads.iter().map(|g| g.as_deref()).collect();
    optimizer.apply_gradients(&refs)?;
    let mut new = Vec::with_capacity(values.len());
    for (i, (shape, device)) in shapes.into_iter().enumerate() {
        new.push(match written[i] {
            true => Some(NewValue::Data(
                TensorData::new(optimizer.variable(i)?, shape),
                device,
            )),
            false => None,
        });
    }
    Ok(new)
}
