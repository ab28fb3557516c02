//! Compute pipelines specialized per [`Variant`] through WGSL `override` constants,
//! built once per (device, variant) and cached on the [`GpuContext`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::shader::{binding, SHADER_SOURCE};
use crate::variant::{Slot, Variant};

/// The three pipelines of one variant, and the bind group layout that every variant on
/// the device shares (so one bind group serves all of them).
#[derive(Debug)]
pub(crate) struct Pipelines {
    /// Layout of group 0.
    pub(crate) layout: wgpu::BindGroupLayout,
    /// Per-chunk partial sums of squares.
    pub(crate) norm_partials: wgpu::ComputePipeline,
    /// Per-tensor and global norms into clip factors.
    pub(crate) norm_finalize: wgpu::ComputePipeline,
    /// The fused update.
    pub(crate) update: wgpu::ComputePipeline,
    /// The 16-bit parameter copy rewritten from the parameters.
    pub(crate) refresh_param_copy: wgpu::ComputePipeline,
    /// `finalize_variable_values` for 16-bit parameters.
    pub(crate) finalize_params: wgpu::ComputePipeline,
}

fn constants(variant: &Variant) -> Vec<(&'static str, f64)> {
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    let slot = |s: Slot| variant.slot_index(s).unwrap_or(0) as f64;
    vec![
        ("CENTERED", b(variant.centered)),
        ("USE_MOMENTUM", b(variant.momentum)),
        ("USE_EMA", b(variant.ema)),
        ("ACCUMULATE", b(variant.accumulate)),
        ("WEIGHT_DECAY", b(variant.weight_decay)),
        ("GUARD", b(variant.guard)),
        ("LOSS_SCALING", b(variant.loss_scaling)),
        ("CLIP_KIND", f64::from(variant.clip.code())),
        ("GRADIENT_DTYPE", f64::from(variant.gradients.code())),
        (
            "PARAM_COPY",
            f64::from(variant.param_copy.map_or(0, |d| d.code())),
        ),
        ("PARAM_DTYPE", f64::from(variant.param_dtype_code())),
        (
            "PARAM_ROUNDING",
            if variant.stochastic_rounding {
                1.0
            } else {
                0.0
            },
        ),
        ("MOMENTUM_SLOT", slot(Slot::Momentum)),
        ("AVERAGE_GRADIENT_SLOT", slot(Slot::AverageGradient)),
        ("EMA_SLOT", slot(Slot::Ema)),
        ("ACCUMULATOR_SLOT", slot(Slot::Accumulator)),
        ("SLOT_COUNT", variant.slots().len() as f64),
        ("STATE_DTYPE", f64::from(variant.state.code())),
        ("STATE_ROUNDING", b(variant.state_stochastic)),
        ("BLOCK_SIZE", f64::from(variant.block_size)),
    ]
}

/// Shader module, layouts and pipelines of one device.
#[derive(Default)]
pub(crate) struct PipelineCache {
    module: Option<wgpu::ShaderModule>,
    layouts: Option<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    by_variant: HashMap<Variant, Arc<Pipelines>>,
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
pub(crate) fn pipelines_for(ctx: &GpuContext, variant: &Variant) -> Result<Arc<Pipelines>> {
    let mut cache = ctx
        .pipelines
        .lock()
        .map_err(|_| Error::Gpu("pipeline cache poisoned".into()))?;
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
        return Err(Error::Gpu("shader module missing".into()));
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
                    storage(binding::STEP_STATE, false),
                    storage(binding::GRADS_16, true),
                    storage(binding::PARAM_COPY, false),
                    storage(binding::PARAMS_16, false),
                    storage(binding::PARAM_REMAINDERS, false),
                    storage(binding::STATE_CODES, false),
                    storage(binding::STATE_ABSMAX, false),
                    storage(binding::CODE_MAPS, true),
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
        return Err(Error::Gpu("pipeline layout missing".into()));
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
            refresh_param_copy: make("refresh_param_copy"),
            finalize_params: make("finalize_params"),
            layout: layout.clone(),
        }
    })?;
    let p = Arc::new(p);
    cache.by_variant.insert(*variant, p.clone());
    Ok(p)
}
