//! Where a tensor of Burn's wgpu backend keeps its elements: a `wgpu::Buffer` and a byte
//! range of it, held in place while the step's copies are recorded and submitted.
//!
//! Burn's wgpu backend is `Fusion<CubeBackend>` (the `fusion` feature, which this crate
//! turns on): a tensor is a fusion handle, resolved to cubecl's tensor (its queued work
//! drained first), whose memory handle cubecl's wgpu server turns into the buffer. A held
//! resource is neither freed nor moved by Burn's memory pool. [`hold_all`] resolves all
//! of a step's tensors in one operation on Burn's fusion stream. [`views`] turns parts of
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
use ::burn::tensor::{Device, Shape};

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

/// One tensor to hold: the tensor, its parameter's name and what it is (for errors).
pub(crate) type ToHold<'a> = (ErasedTensor, &'a str, &'static str);

/// The buffers holding `tensors`, all on `device`, resolved in one operation on Burn's
/// fusion stream (on Burn's own thread, with none of the two blocking round trips per
/// tensor that resolving each through Burn's fusion client would cost), after
/// everything Burn queued before; everything Burn queued is on the wgpu queue when this
/// returns.
///
/// The tensors are given up: one nobody else holds (a gradient) is Burn's to free
/// inside that operation, its memory held only by the returned [`HeldBuffer`]. Dropped
/// after it instead, each would queue a drop operation of its own on Burn's stream,
/// which grows with every one (1,000 gradients: 8 to 17 ms a step on lavapipe).
pub(crate) fn hold_all(tensors: Vec<ToHold<'_>>, device: &Device) -> Result<Vec<HeldBuffer>> {
    // Every handle first: a tensor of another backend is refused before any is given up
    // (one given up to no operation would never be freed).
    let mut fusions = Vec::with_capacity(tensors.len());
    for (tensor, name, what) in tensors {
        let size = (tensor.shape.iter().product::<usize>() * tensor.dtype.size()) as u64;
        fusions.push((into_fusion(tensor, name, what)?, size, name));
    }
    let Some(client) = fusions.first().map(|(fusion, ..)| fusion.client.clone()) else {
        return Ok(Vec::new());
    };
    let mut inputs = Vec::with_capacity(fusions.len());
    let mut names = Vec::with_capacity(fusions.len());
    for (fusion, size, name) in fusions {
        inputs.push((fusion.into_ir(), size));
        names.push(name);
    }
    let output = placeholder_output(client.create_empty_handle(), &inputs[0].0);
    let irs: Vec<TensorIr> = inputs.iter().map(|(ir, _)| ir.clone()).collect();
    let desc = CustomOpIr::new("fused_rmsprop_hold", &irs, std::slice::from_ref(&output));
    let (sender, receiver) = std::sync::mpsc::channel();
    let out_id = output.id;
    let op = OperationFn(
        move |handles: &mut HandleContainer<<CubeBackend as BackendIr>::Handle>| {
            let mut cubes = Vec::with_capacity(inputs.len());
            for (k, (ir, size)) in inputs.iter().enumerate() {
                let cube: CubeTensor = handles.get_float_tensor::<CubeBackend>(ir);
                if k == 0 {
                    handles.register_float_tensor::<CubeBackend>(&out_id, cube.clone());
                }
                cubes.push((cube, *size));
            }
            // One call to cubecl's device thread for all the claims: a claim made there
            // runs at once instead of being a round trip of its own.
            let count = cubes.len();
            let device = cubes[0].0.client.clone();
            let held = device
                .exclusive(move || {
                    cubes
                        .into_iter()
                        .map(|(cube, size)| claim(cube, size))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_else(|e| {
                    (0..count)
                        .map(|_| Err(BurnProblem::Backend(e.to_string())))
                        .collect()
                });
            // The caller waits for this; it is gone only if it already failed.
            let _ = sender.send(held);
            Ok(())
        },
    );
    drop(client.register(StreamId::current(), OperationIr::Custom(desc), op));
    device.flush().map_err(|e| Error::Gpu(e.to_string()))?;
    let held = receiver
        .recv()
        .map_err(|_| Error::Gpu("Burn did not run the step's buffer claims".into()))?;
    held.into_iter()
        .zip(names)
        .map(|(h, name)| {
            h.map_err(|problem| Error::BurnParam {
                name: name.to_string(),
                problem,
            })
        })
        .collect()
}

/// The output an operation of ours that makes no tensor must still declare: handle `id`,
/// shaped as its `first` input, of which the operation registers a view (dropped at
/// once by the caller).
fn placeholder_output(id: TensorId, first: &TensorIr) -> TensorIr {
    TensorIr {
        id,
        shape: first.shape.clone(),
        status: TensorStatus::NotInit,
        dtype: first.dtype,
    }
}

/// A fusion handle of Burn's wgpu backend.
type FusionHandle = ::burn::backend::fusion::FusionTensor<
    <CubeBackend as ::burn::backend::fusion::FusionBackend>::FusionRuntime,
>;

/// The fusion handle of a tensor of Burn's wgpu backend (another handle to it).
fn fusion_of(tensor: &ErasedTensor, name: &str, what: &'static str) -> Result<FusionHandle> {
    into_fusion(tensor.clone(), name, what)
}

/// The fusion handle of a tensor of Burn's wgpu backend, the tensor given up.
fn into_fusion(tensor: ErasedTensor, name: &str, what: &'static str) -> Result<FusionHandle> {
    let device = tensor.device.clone();
    Tensor::<1>::from_dispatch(tensor.dispatch)
        .try_into_primitive::<BurnWgpu>()
        .map_err(|_| Error::BurnParam {
            name: name.to_string(),
            problem: BurnProblem::Device {
                what,
                expected: "Burn's wgpu backend".into(),
                found: format!("{device:?}"),
            },
        })
}

/// cubecl's claim on a resolved tensor's memory. A strided tensor (a convolution's
/// gradient, a transposed parameter) is first made contiguous by Burn's own kernel, queued
/// on Burn's stream before the step. (Burn makes a view only at its memory alignment, so
/// a tensor's data starts on a 4-byte word, as wgpu's copies need: `device` checks.)
fn claim(cube: CubeTensor, size: u64) -> std::result::Result<HeldBuffer, BurnProblem> {
    let cube = burn_cubecl::kernel::into_contiguous(cube);
    let managed = cube
        .client
        .get_resource::<WgpuServer<AutoCompiler>>(cube.handle.clone())
        .map_err(|e| BurnProblem::Backend(e.to_string()))?;
    let resource = managed.resource();
    if resource.size < size {
        return Err(BurnProblem::Backend(format!(
            "its buffer range holds {} bytes, its elements need {size}",
            resource.size
        )));
    }
    let (buffer, offset) = (resource.buffer.clone(), resource.offset);
    Ok(HeldBuffer {
        buffer,
        offset,
        size,
        _keep: (cube, Box::new(managed)),
    })
}

/// Gives `tensors` (of Burn's wgpu backend) back to Burn in one operation on its fusion
/// stream, which frees those nobody else holds. Dropped one by one, each would queue a
/// drop operation of its own (a step's 1,000 replaced parameters: about 9 ms on
/// lavapipe). A tensor of another backend is dropped as usual.
pub(crate) fn release(tensors: Vec<ErasedTensor>) {
    let mut inputs = Vec::with_capacity(tensors.len());
    let mut client = None;
    for tensor in tensors {
        // (another backend's tensor comes back in the error, and is dropped here)
        let Ok(fusion) = into_fusion(tensor, "", "") else {
            continue;
        };
        client.get_or_insert_with(|| fusion.client.clone());
        inputs.push(fusion.into_ir());
    }
    let Some(client) = client else {
        return;
    };
    let output = placeholder_output(client.create_empty_handle(), &inputs[0]);
    let desc = CustomOpIr::new(
        "fused_rmsprop_release",
        &inputs,
        std::slice::from_ref(&output),
    );
    let out_id = output.id;
    let op = OperationFn(
        move |handles: &mut HandleContainer<<CubeBackend as BackendIr>::Handle>| {
            for (k, ir) in inputs.iter().enumerate() {
                // a tensor given up for good leaves the container here, and is freed
                let cube: CubeTensor = handles.get_float_tensor::<CubeBackend>(ir);
                if k == 0 {
                    handles.register_float_tensor::<CubeBackend>(&out_id, cube);
                }
            }
            Ok(())
        },
    );
    drop(client.register(StreamId::current(), OperationIr::Custom(desc), op));
}

/// The fusion handle's id of a tensor of Burn's wgpu backend (`None` on another
/// backend): a tensor keeps it until Burn's code replaces it.
pub(crate) fn fusion_id(tensor: &ErasedTensor) -> Option<TensorId> {
    fusion_of(tensor, "", "").ok().map(|fusion| fusion.id)
}

/// Tensors of Burn's wgpu backend viewing `parts` of `flat` (contiguous, of any element
/// type): `(start, shape)` in elements, each start a multiple of Burn's memory
/// alignment. One operation on Burn's fusion stream makes them all, each a view of
/// `flat`'s memory (which lives as long as one of them does), given with its fusion
/// handle's id. Burn's own `slice` would copy a part whose end is not aligned too.
pub(crate) fn views(
    flat: ErasedTensor,
    parts: Vec<(usize, Vec<usize>)>,
    name: &str,
) -> Result<Vec<(ErasedTensor, TensorId)>> {
    let (device, dtype) = (flat.device.clone(), flat.dtype);
    let element = dtype.size() as u64;
    let total: usize = flat.shape.iter().product();
    let fusion = fusion_of(&flat, name, "new values")?;
    drop(flat);
    let client = fusion.client.clone();
    let input: TensorIr = fusion.into_ir();
    let outputs: Vec<TensorIr> = parts
        .iter()
        .map(|(_, shape)| TensorIr {
            id: client.create_empty_handle(),
            shape: Shape::from(shape.clone()),
            status: TensorStatus::NotInit,
            dtype,
        })
        .collect();
    let desc = CustomOpIr::new(
        "fused_rmsprop_views",
        std::slice::from_ref(&input),
        &outputs,
    );
    let outs = outputs.clone();
    let op = OperationFn(
        move |handles: &mut HandleContainer<<CubeBackend as BackendIr>::Handle>| {
            let flat: CubeTensor = handles.get_float_tensor::<CubeBackend>(&input);
            for (out, (start, shape)) in outs.iter().zip(&parts) {
                let len: usize = shape.iter().product();
                let handle = flat
                    .handle
                    .clone()
                    .offset_start(*start as u64 * element)
                    .offset_end((total - start - len) as u64 * element);
                let view = CubeTensor::new_contiguous(
                    flat.client.clone(),
                    flat.device.clone(),
                    Shape::from(shape.clone()),
                    handle,
                    dtype,
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
        .map(|(tensor, ir)| {
            let id = tensor.id;
            let view = ErasedTensor {
                dispatch: Tensor::<1>::from_primitive::<BurnWgpu>(tensor).into_dispatch(),
                shape: ir.shape.to_vec(),
                dtype,
                device: device.clone(),
            };
            (view, id)
        })
        .collect())
}
