//! What the kernels need from a device, checked before any wgpu call can fail on it.
//!
//! Every mode binds the same two uniforms and four storage buffers (`contract`), runs
//! 256 invocations per workgroup and the same workgroup memory, so one check
//! ([`check_device`]) serves every mode and runs when a context is made; the sizes of a
//! model's buffers are checked when its arena is laid out ([`check_binding`],
//! [`check_workgroups`]). Every shortfall is an [`Error::DeviceLimit`] naming the limit,
//! the device's value and what is needed.

use crate::error::{Error, Result};
use crate::gpu::contract::{BINDINGS, STORAGE_BUFFERS, UNIFORM_BUFFERS};
use crate::gpu::shader::{StepUniform, WORKGROUP_MEMORY_BYTES, WORKGROUP_SIZE};

/// The limits [`crate::GpuContext::new`] asks for: WebGPU's defaults (what a browser
/// gives and most wgpu programs ask for), with the storage-binding and buffer sizes
/// raised to the adapter's. Larger bindings keep large models in fewer segments (one
/// set of dispatches each) and let a tensor over 128 MiB be bound as one view. An
/// adapter below WebGPU's defaults (a GLES-class device) is asked for its own limits,
/// which [`check_device`] then judges.
pub(crate) fn requested(adapter: &wgpu::Limits) -> wgpu::Limits {
    let defaults = wgpu::Limits::default();
    if !defaults.check_limits(adapter) {
        return adapter.clone();
    }
    wgpu::Limits {
        max_storage_buffer_binding_size: adapter.max_storage_buffer_binding_size,
        max_buffer_size: adapter.max_buffer_size,
        ..defaults
    }
}

fn need(limit: &'static str, device: u64, needed: u64) -> Result<()> {
    if device < needed {
        return Err(Error::DeviceLimit {
            limit,
            device,
            needed,
        });
    }
    Ok(())
}

/// What every mode needs: binding counts, the uniform's size, the workgroup's size
/// and memory.
pub(crate) fn check_device(limits: &wgpu::Limits) -> Result<()> {
    need("max_bind_groups", limits.max_bind_groups.into(), 1)?;
    need(
        "max_bindings_per_bind_group",
        limits.max_bindings_per_bind_group.into(),
        BINDINGS.len() as u64,
    )?;
    need(
        "max_storage_buffers_per_shader_stage",
        limits.max_storage_buffers_per_shader_stage.into(),
        STORAGE_BUFFERS.into(),
    )?;
    need(
        "max_uniform_buffers_per_shader_stage",
        limits.max_uniform_buffers_per_shader_stage.into(),
        UNIFORM_BUFFERS.into(),
    )?;
    need(
        "max_uniform_buffer_binding_size",
        limits.max_uniform_buffer_binding_size,
        std::mem::size_of::<StepUniform>() as u64,
    )?;
    need(
        "max_compute_invocations_per_workgroup",
        limits.max_compute_invocations_per_workgroup.into(),
        WORKGROUP_SIZE as u64,
    )?;
    need(
        "max_compute_workgroup_size_x",
        limits.max_compute_workgroup_size_x.into(),
        WORKGROUP_SIZE as u64,
    )?;
    need(
        "max_compute_workgroup_storage_size",
        limits.max_compute_workgroup_storage_size.into(),
        WORKGROUP_MEMORY_BYTES,
    )?;
    // a storage binding must hold at least one vec4 per binding
    need(
        "max_storage_buffer_binding_size",
        limits.max_storage_buffer_binding_size,
        16,
    )
}

/// A buffer of `bytes` bound whole as storage: within the binding size and the buffer
/// size.
pub(crate) fn check_binding(limits: &wgpu::Limits, bytes: u64) -> Result<()> {
    need(
        "max_storage_buffer_binding_size",
        limits.max_storage_buffer_binding_size,
        bytes,
    )?;
    need("max_buffer_size", limits.max_buffer_size, bytes)
}

/// `workgroups` workgroups in one dispatch, on a 2D grid (`x` up to the limit, then
/// rows of it).
pub(crate) fn check_workgroups(limits: &wgpu::Limits, workgroups: usize) -> Result<()> {
    let per_dimension = u64::from(limits.max_compute_workgroups_per_dimension);
    let rows = (workgroups as u64).div_ceil(per_dimension.max(1));
    if rows <= per_dimension {
        return Ok(());
    }
    let needed = (workgroups as f64).sqrt().ceil() as u64;
    need(
        "max_compute_workgroups_per_dimension",
        per_dimension,
        needed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WebGPU's defaults and the GLES-class downlevel defaults pass; one storage
    /// buffer fewer is refused with the numbers.
    #[test]
    fn default_and_downlevel_limits_are_enough() {
        check_device(&wgpu::Limits::default()).unwrap();
        check_device(&wgpu::Limits::downlevel_defaults()).unwrap();
        let short = wgpu::Limits {
            max_storage_buffers_per_shader_stage: 3,
            ..wgpu::Limits::downlevel_defaults()
        };
        let e = check_device(&short).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DeviceLimit {
                    limit: "max_storage_buffers_per_shader_stage",
                    device: 3,
                    needed: 4
                }
            ),
            "{e}"
        );
        let small = wgpu::Limits {
            max_compute_workgroup_storage_size: 1024,
            ..wgpu::Limits::default()
        };
        assert!(check_device(&small).is_err());
        // a 2D grid: 65,535 x 65,535 workgroups fit, one more row does not
        let grid = wgpu::Limits::default();
        check_workgroups(&grid, 65_535 * 65_535).unwrap();
        assert!(check_workgroups(&grid, 65_535 * 65_535 + 1).is_err());
        let e = check_binding(&wgpu::Limits::default(), 200 << 20).unwrap_err();
        assert!(
            e.to_string().contains("max_storage_buffer_binding_size"),
            "{e}"
        );
    }
}
