//! Where a tensor of Burn's wgpu backend keeps its elements: a `wgpu::Buffer` and a byte
//! range of it, held in place while the step's copies are recorded and submitted.
//!
//! Burn's wgpu backend is `Fusion<CubeBackend>` (the `fusion` feature, which this crate
//! turns on): a tensor is a fusion handle, resolved to cubecl's tensor (its queued work
//! drained first), whose memory handle cubecl's wgpu server turns into the buffer. A held
//! resource is neither freed nor moved by Burn's memory pool. [`views`] turns parts of
//! one such buffer into tensors of their own, with no copy.

use std::any::Any;

use ::burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, OperationFn, OperationIr, StreamId, TensorIr,
};
use ::burn::backend::fusion::Fusion;
use ::burn::backend::ir::{BackendIr, TensorId, TensorStatus};
use ::burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor};
use ::burn::cubecl::wgpu::WgpuServer;
use ::burn::tensor::Tensor;
use ::burn::tensor::{DType, Shape};

use crate::burn_bridge::module::ErasedTensor;
use crate::error::{BurnProblem, Error, Result};

/// Burn's wgpu backend as this crate builds it.
type BurnWgpu = Fusion<CubeBackend>;

/// One tensor's elements on the device, kept from moving while held.
pub(crate) struct HeldBuffer {
    pub(crate) buffer: wgpu::Buffer,
    /// Byte offset of the first element.
    pub(crate) offset: u64,
    /// Bytes of the tensor's elements.
    pub(crate) size: u64,
    /// Burn's tensor and cubecl's claim on its memory: dropped after the submission.
    _keep: (CubeTensor, Box<dyn Any + Send>),
}

/// The buffer holding `tensor` (a parameter's, a gradient's or a new value's), for the
/// parameter `name`; `what` says which, for errors.
pub(crate) fn hold(tensor: &ErasedTensor, name: &str, what: &'static str) -> Result<HeldBuffer> {
    let refuse = |problem| Error::BurnParam {
        name: name.to_string(),
        problem,
    };
    let fusion = Tensor::<1>::from_dispatch(tensor.dispatch.clone())
        .try_into_primitive::<BurnWgpu>()
        .map_err(|_| {
            refuse(BurnProblem::Device {
                what,
                expected: "Burn's wgpu backend".into(),
                found: format!("{:?}", tensor.device),
            })
        })?;
    let client = fusion.client.clone();
    let cube: CubeTensor = client.resolve_tensor_float::<CubeBackend>(fusion);
    if !cube.is_contiguous() {
        return Err(refuse(BurnProblem::NotContiguous(what)));
    }
    let elements: usize = tensor.shape.iter().product();
    let size = (elements * tensor.dtype.size()) as u64;
    let managed = cube
        .client
        .get_resource::<WgpuServer<AutoCompiler>>(cube.handle.clone())
        .map_err(|e| refuse(BurnProblem::Backend(e.to_string())))?;
    let resource = managed.resource();
    let (buffer, offset) = (resource.buffer.clone(), resource.offset);
    if resource.size < size {
        return Err(refuse(BurnProblem::Backend(format!(
            "its buffer range holds {} bytes, its {elements} elements need {size}",
            resource.size
        ))));
    }
    Ok(HeldBuffer {
        buffer,
        offset,
        size,
        _keep: (cube, Box::new(managed)),
    })
}

/// The fusion handle's id of a tensor of Burn's wgpu backend (`None` on another
/// backend): a tensor keeps it until Burn's code replaces it.
pub(crate) fn fusion_id(tensor: &ErasedTensor) -> Option<TensorId> {
    Tensor::<1>::from_dispatch(tensor.dispatch.clone())
        .try_into_primitive::<BurnWgpu>()
        .ok()
        .map(|fusion| fusion.id)
}

/// Tensors of Burn's wgpu backend viewing `parts` of `flat` (f32, contiguous): `(start,
/// shape)` in elements, each start a multiple of Burn's memory alignment. One operation
/// on Burn's fusion stream makes them all, each a view of `flat`'s memory (which lives
/// as long as one of them does). Burn's own `slice` would copy a part whose end is not
/// aligned too.
pub(crate) fn views(
    flat: ErasedTensor,
    parts: Vec<(usize, Vec<usize>)>,
    name: &str,
) -> Result<Vec<ErasedTensor>> {
    let device = flat.device.clone();
    let total: usize = flat.shape.iter().product();
    let fusion = Tensor::<1>::from_dispatch(flat.dispatch)
        .try_into_primitive::<BurnWgpu>()
        .map_err(|_| Error::BurnParam {
            name: name.to_string(),
            problem: BurnProblem::Device {
                what: "new values",
                expected: "Burn's wgpu backend".into(),
                found: format!("{device:?}"),
            },
        })?;
    let client = fusion.client.clone();
    let input: TensorIr = fusion.into_ir();
    let outputs: Vec<TensorIr> = parts
        .iter()
        .map(|(_, shape)| TensorIr {
            id: client.create_empty_handle(),
            shape: Shape::from(shape.clone()),
            status: TensorStatus::NotInit,
            dtype: DType::F32,
        })
        .collect();
    let desc = CustomOpIr::new("fused_rmsprop_views", std::slice::from_ref(&input), &outputs);
    let outs = outputs.clone();
    let op = OperationFn(
        move |handles: &mut HandleContainer<<CubeBackend as BackendIr>::Handle>| {
            let flat: CubeTensor = handles.get_float_tensor::<CubeBackend>(&input);
            for (out, (start, shape)) in outs.iter().zip(&parts) {
                let len: usize = shape.iter().product();
                let handle = flat
                    .handle
                    .clone()
                    .offset_start((start * 4) as u64)
                    .offset_end(((total - start - len) * 4) as u64);
                let view = CubeTensor::new_contiguous(
                    flat.client.clone(),
                    flat.device.clone(),
                    Shape::from(shape.clone()),
                    handle,
                    DType::F32,
                );
                handles.register_float_tensor::<CubeBackend>(&out.id, view);
            }
            Ok(())
        },
    );
    let tensors = client.register(StreamId::current(), OperationIr::Custom(desc), op);
    Ok(tensors
        .into_iter()
        .zip(outputs)
        .map(|(tensor, ir)| ErasedTensor {
            dispatch: Tensor::<1>::from_primitive::<BurnWgpu>(tensor).into_dispatch(),
            shape: ir.shape.to_vec(),
            dtype: DType::F32,
            device: device.clone(),
        })
        .collect())
}
