//! One step on Burn's wgpu device, in one submission (three under the non-finite guard,
//! which decides on the device in its own):
//!
//! - each gradient, and each parameter whose value is not the one the last step
//!   installed, is copied into the optimizer's arena;
//! - the fused step;
//! - the new values are copied into one flat tensor of Burn's memory pool laid out as
//!   the arena is (one copy per run of neighbouring parameters), and each parameter
//!   becomes a view of its part of it.
//!
//! Finding a tensor's buffer takes Burn's threads (resolving the fusion handle, claiming
//! the memory), so all of a step's tensors are found in one operation on Burn's fusion
//! stream, and a parameter only when Burn's code replaced it.

use ::burn::backend::ir::TensorId;
use ::burn::tensor::{DType, Device, Tensor};

use crate::burn_bridge::buffers::{self, HeldBuffer};
use crate::burn_bridge::module::{ErasedTensor, NewValue, Taken};
use crate::error::{BurnProblem, Error, Result};
use crate::gpu::GpuContext;
use crate::optimizer::RmsProp;

/// One step of parameters (and gradients) of element type `dtype`; `installed[i]` is the
/// tensor the last step installed as parameter `i`, and `written[i]` says whether
/// parameter `i` gets a new value.
///
/// A copy moves whole 4-byte words, as wgpu's copies must: a 16-bit tensor of odd
/// length also moves the 2 bytes after it. Those are padding on both sides: the arena's
/// after each tensor (its kernels mask padding lanes), the output's between its parts,
/// and a Burn tensor's inside its memory slice (slices start at Burn's memory alignment,
/// a multiple of 4 bytes; a read there is harmless).
#[allow(clippy::too_many_arguments)]
pub(crate) fn step(
    optimizer: &mut RmsProp,
    dtype: DType,
    device: &Device,
    context: &GpuContext,
    installed: &[Option<TensorId>],
    written: &[bool],
    mut taken: Vec<Taken>,
) -> Result<Vec<Option<NewValue>>> {
    let present: Vec<bool> = taken.iter().map(|t| t.grad.is_some()).collect();
    let mut encoder = context
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("fused-rmsprop burn step"),
        });
    // The new values' places in one flat output: each part starts on Burn's memory
    // alignment, as the binding offset of a view of it must.
    let element = dtype.size();
    let limits = context.device.limits();
    let align = (limits
        .min_uniform_buffer_offset_alignment
        .max(limits.min_storage_buffer_offset_alignment) as usize
        / element)
        .max(4 / element);
    let engine = optimizer
        .gpu()
        .ok_or(Error::NeedsGpuBackend("BurnRmsProp::wgpu"))?;
    let arena: Vec<Option<(wgpu::Buffer, u64)>> = written
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            w.then(|| engine.param_view(i).map(|v| (v.buffer.clone(), v.offset)))
                .transpose()
        })
        .collect::<Result<_>>()?;
    let (parts, runs) = output_layout(&taken, &arena, element, align);
    let total = runs.last().map_or(0, |r| r.flat + (r.end - r.start)) as usize / element;
    let flat = ErasedTensor::of(Tensor::<1>::empty([total.max(align)], (device, dtype)));
    // The tensors to read or write: the output, the gradients (given up: Burn frees them
    // in the same operation), and the parameters Burn's code replaced since the last step.
    let mut wanted: Vec<buffers::ToHold<'_>> =
        vec![(flat.clone(), "(the step's output)", "new values")];
    let mut copies = Vec::new();
    for (i, t) in taken.iter_mut().enumerate() {
        let id = buffers::fusion_id(&t.value);
        if id.is_none() || id != installed.get(i).copied().flatten() {
            wanted.push((t.value.clone(), &t.name, "parameter"));
            copies.push((i, false));
        }
        if let Some(g) = t.grad.take() {
            wanted.push((g, &t.name, "gradient"));
            copies.push((i, true));
        }
    }
    let mut held = buffers::hold_all(wanted, device)?.into_iter();
    let out = held.next().expect("the output is held first");
    let held: Vec<HeldBuffer> = held.collect();
    // Every copy is checked before anything is recorded or written.
    for (&(i, gradient), source) in copies.iter().zip(&held) {
        let words = source.size.next_multiple_of(4);
        if source.offset % 4 != 0 || source.offset + words > source.buffer.size() {
            return Err(Error::BurnParam {
                name: taken[i].name.clone(),
                problem: BurnProblem::Backend(format!(
                    "its {} ({} bytes at byte {} of a buffer of {}) cannot be copied in 4-byte words",
                    if gradient { "gradient" } else { "value" },
                    source.size,
                    source.offset,
                    source.buffer.size()
                )),
            });
        }
    }
    let remainders = optimizer.precision().param_remainders;
    for (&(i, gradient), source) in copies.iter().zip(&held) {
        let view = if gradient {
            engine.gradient_view(i)?
        } else {
            engine.param_view(i)?
        };
        encoder.copy_buffer_to_buffer(
            &source.buffer,
            source.offset,
            view.buffer,
            view.offset,
            source.size.next_multiple_of(4),
        );
        if remainders && !gradient {
            // a new bf16 value is its own master: remainder 0x7fff (dtype::split_master)
            let rem = engine.param_remainders_view(i)?;
            let fill: Vec<u8> = [0xff, 0x7f].repeat(rem.size as usize / 2);
            context.queue.write_buffer(rem.buffer, rem.offset, &fill);
        }
    }
    if optimizer.non_finite_guard() {
        // The guard decides on the device in its own submissions.
        context.queue.submit([encoder.finish()]);
        optimizer.apply_device_gradients(&present)?;
        encoder = context
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fused-rmsprop burn step: out"),
            });
    } else {
        optimizer.record_device_step(&present, &mut encoder)?;
    }
    for run in &runs {
        encoder.copy_buffer_to_buffer(
            &run.buffer,
            run.start,
            &out.buffer,
            out.offset + run.flat,
            run.end - run.start,
        );
    }
    context.queue.submit([encoder.finish()]);
    drop((held, out));
    context.take_error()?;
    let mut views = buffers::views(
        flat,
        parts.iter().flatten().cloned().collect(),
        "(the step's output)",
    )?
    .into_iter();
    Ok(parts
        .into_iter()
        .map(|part| part.and_then(|_| views.next().map(|(view, id)| NewValue::Tensor(view, id))))
        .collect())
}

/// A new value's place in the step's output: its first element and its shape.
type Part = (usize, Vec<usize>);

/// A range of one arena parameter buffer copied whole into the step's output: parameters
/// next to each other in the arena (the padding between them comes along, unread).
#[derive(Debug)]
struct OutputRun {
    buffer: wgpu::Buffer,
    /// Bytes of the arena buffer: from the run's first parameter to the end of its last
    /// (rounded up to 4-byte words).
    start: u64,
    end: u64,
    /// Byte offset of `start` in the output.
    flat: u64,
}

/// Where each written parameter's new value lies in the step's flat output (its first
/// element and shape, `None` for one not written), and the runs of the arena that the
/// output copies: a parameter joins the run before it when it is the next parameter, in
/// the same arena buffer, after it, and keeps its place on Burn's memory alignment
/// (`align` elements), so that one copy moves a whole run (one per arena segment, where
/// every parameter is written: a copy command per parameter cost lavapipe about 1 us
/// each, host and device together).
fn output_layout(
    taken: &[Taken],
    arena: &[Option<(wgpu::Buffer, u64)>],
    element: usize,
    align: usize,
) -> (Vec<Option<Part>>, Vec<OutputRun>) {
    let align_bytes = (align * element) as u64;
    let mut parts = Vec::with_capacity(taken.len());
    let mut runs: Vec<OutputRun> = Vec::new();
    let mut last = None;
    for (i, (t, place)) in taken.iter().zip(arena).enumerate() {
        let Some((buffer, offset)) = place else {
            parts.push(None);
            continue;
        };
        let bytes = ((t.shape.iter().product::<usize>() * element) as u64).next_multiple_of(4);
        let joins = match runs.last() {
            Some(run) => {
                last == Some(i.wrapping_sub(1))
                    && run.buffer == *buffer
                    && *offset >= run.end
                    && (offset - run.start) % align_bytes == 0
            }
            None => false,
        };
        if !joins {
            let flat = runs.last().map_or(0, |r| {
                (r.flat + (r.end - r.start)).next_multiple_of(align_bytes)
            });
            runs.push(OutputRun {
                buffer: buffer.clone(),
                start: *offset,
                end: *offset,
                flat,
            });
        }
        let run = runs.last_mut().expect("pushed above");
        run.end = offset + bytes;
        parts.push(Some((
            (run.flat + (offset - run.start)) as usize / element,
            t.shape.clone(),
        )));
        last = Some(i);
    }
    (parts, runs)
}
