//! Where a tensor of Burn's wgpu backend keeps its elements: a `wgpu::Buffer` and a byte
//! range of it, held in place while the step's copies are recorded and submitted.
//!
//! Burn's wgpu backend is `Fusion<CubeBackend>` (the `fusion` feature, which this crate
//! turns on): a tensor is a fusion handle, resolved to cubecl's tensor (its queued work
//! drained first), whose memory handle cubecl's wgpu server turns into the buffer. A held
//! resource is neither freed nor moved by Burn's memory pool.

use std::any::Any;

use ::burn::backend::fusion::Fusion;
use ::burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor};
use ::burn::cubecl::wgpu::WgpuServer;
use ::burn::tensor::Tensor;

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
