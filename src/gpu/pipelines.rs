//! Compute pipelines specialized per [`Variant`] through WGSL `override` constants,
//! built once per (device, variant) and cached.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::plan::{ClipKind, Variant};

/// The WGSL source, validated for every specialization by `build.rs`.
pub const SHADER_SOURCE: &str = include_str!("../../shaders/rmsprop.wgsl");

/// Threads per workgroup (`WORKGROUP_SIZE` in the shader).
pub const WORKGROUP_SIZE: usize = 256;

/// Elements per chunk on the GPU: eight per thread of one workgroup.
pub const GPU_CHUNK_LEN: usize = WORKGROUP_SIZE * 8;

/// Plans in the step uniform (`PLAN_WINDOW` in the shader): with the non-finite guard,
/// the most steps that may be in flight before the host waits for a readback.
pub const PLAN_WINDOW: usize = 64;

/// Words in one plan (`StepScalars` in the shader).
pub const PLAN_WORDS: usize = 16;

/// Words before the plans in the step uniform (`base_lo`, `len`, `tensor_count`, pad).
pub const UNIFORM_HEADER_WORDS: usize = 4;

/// Bytes of the step uniform.
pub const UNIFORM_BYTES: u64 = ((UNIFORM_HEADER_WORDS + PLAN_WINDOW * PLAN_WORDS) * 4) as u64;

/// Binding numbers, as declared in the shader.
pub(crate) mod binding {
    pub const UNIFORM: u32 = 0;
    pub const CHUNKS: u32 = 1;
    pub const TENSORS: u32 = 2;
    pub const PARAMS: u32 = 3;
    pub const GRADS: u32 = 4;
    pub const SLOTS: u32 = 5;
    pub const PARTIALS: u32 = 6;
    pub const CLIPS: u32 = 7;
    pub const GUARD: u32 = 8;
}

/// The three pipelines of one variant, and the bind group layout that every variant on
/// the device shares (so one bind group serves all of them).
#[derive(Debug)]
pub struct Pipelines {
    /// Layout of group 0.
    pub layout: wgpu::BindGroupLayout,
    /// Per-chunk partial sums of squares.
    pub norm_partials: wgpu::ComputePipeline,
    /// Per-tensor and global norms into clip factors.
    pub norm_finalize: wgpu::ComputePipeline,
    /// The fused update.
    pub update: wgpu::ComputePipeline,
}

/// Slot order in the arena: velocity, then momentum, average_gradient, EMA, accumulator
/// when used (matches [`Variant::slot_names`]).
pub fn slot_index(variant: &Variant, name: &str) -> Option<usize> {
    variant.slot_names().iter().position(|n| *n == name)
}

fn constants(variant: &Variant) -> Vec<(&'static str, f64)> {
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    let slot = |n: &str| slot_index(variant, n).unwrap_or(0) as f64;
    vec![
        ("CENTERED", b(variant.centered)),
        ("USE_MOMENTUM", b(variant.momentum)),
        ("USE_EMA", b(variant.ema)),
        ("ACCUMULATE", b(variant.accumulate)),
        ("WEIGHT_DECAY", b(variant.weight_decay)),
        ("GUARD", b(variant.guard)),
        (
            "CLIP_KIND",
            match variant.clip {
                ClipKind::None => 0.0,
                ClipKind::Norm => 1.0,
                ClipKind::GlobalNorm => 2.0,
                ClipKind::Value => 3.0,
            },
        ),
        ("MOMENTUM_SLOT", slot("momentum")),
        ("AVERAGE_GRADIENT_SLOT", slot("average_gradient")),
        ("EMA_SLOT", slot("average")),
        ("ACCUMULATOR_SLOT", slot("accumulated_gradient")),
    ]
}

/// Shader module, layouts and pipelines of one device.
#[derive(Default)]
pub struct PipelineCache {
    module: Option<wgpu::ShaderModule>,
    layouts: Option<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    by_variant: HashMap<Variant, Arc<Pipelines>>,
}

impl PipelineCache {
    /// Number of variants built so far.
    pub fn len(&self) -> usize {
        self.by_variant.len()
    }

    /// True when nothing was built yet.
    pub fn is_empty(&self) -> bool {
        self.by_variant.is_empty()
    }
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

/// The pipelines for `variant` on `ctx`, built on first use.
pub fn pipelines_for(ctx: &GpuContext, variant: &Variant) -> Result<Arc<Pipelines>> {
    let mut cache = ctx
        .pipelines
        .lock()
        .map_err(|_| crate::Error::Gpu("pipeline cache poisoned".into()))?;
    if let Some(p) = cache.by_variant.get(variant) {
        return Ok(p.clone());
    }
    let device = &ctx.device;
    if cache.module.is_none() {
        let module = ctx.scoped("compiling shaders/rmsprop.wgsl", || {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("rmsprop.wgsl"),
                source: wgpu::ShaderSource::Wgsl(SHADER_SOURCE.into()),
            })
        })?;
        cache.module = Some(module);
    }
    let Some(module) = cache.module.clone() else {
        return Err(crate::Error::Gpu("shader module missing".into()));
    };
    if cache.layouts.is_none() {
        let layouts = ctx.scoped("building the bind group layout", || {
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("rmsprop group 0"),
                entries: &[
                    wgpu::BindGroupLayoutEntry {
                        binding: binding::UNIFORM,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Uniform,
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    },
                    storage(binding::CHUNKS, true),
                    storage(binding::TENSORS, true),
                    storage(binding::PARAMS, false),
                    storage(binding::GRADS, true),
                    storage(binding::SLOTS, false),
                    storage(binding::PARTIALS, false),
                    storage(binding::CLIPS, false),
                    storage(binding::GUARD, false),
                ],
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("rmsprop"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            (layout, pipeline_layout)
        })?;
        cache.layouts = Some(layouts);
    }
    let Some((layout, pipeline_layout)) = cache.layouts.clone() else {
        return Err(crate::Error::Gpu("pipeline layout missing".into()));
    };
    let p = ctx.scoped("building pipelines", || {
        let constants = constants(variant);
        let make = |entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: true,
                },
                cache: None,
            })
        };
        Pipelines {
            norm_partials: make("norm_partials"),
            norm_finalize: make("norm_finalize"),
            update: make("update"),
            layout: layout.clone(),
        }
    })?;
    let p = Arc::new(p);
    cache.by_variant.insert(*variant, p.clone());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shader's constants agree with the host's.
    #[test]
    fn shader_constants_match_the_host() {
        for line in [
            format!("const WORKGROUP_SIZE: u32 = {WORKGROUP_SIZE}u;"),
            format!("const PLAN_WINDOW: u32 = {PLAN_WINDOW}u;"),
        ] {
            assert!(SHADER_SOURCE.contains(&line), "shader lacks `{line}`");
        }
        let scalars = SHADER_SOURCE
            .split("struct StepScalars {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .expect("struct StepScalars");
        assert_eq!(scalars.matches(": f32").count(), PLAN_WORDS);
    }
}
