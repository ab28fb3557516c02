//! Compute pipelines specialized per [`Variant`] through WGSL `override` constants,
//! built once per (device, variant) and cached on the [`GpuContext`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::contract::{self, BindingKind};
use crate::gpu::shader::SHADER_SOURCE;
use crate::math::KERNEL_FLAGS;
use crate::state::{StateDtype, MAX_BLOCK_SIZE};
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

/// Who finds an int8 block's new scale (the shader's `BLOCK_PER_INVOCATION`), chosen
/// per device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum BlockReduction {
    /// The `block_size / 4` invocations that step the block, through workgroup memory
    /// and barriers: hardware GPUs.
    #[default]
    Workgroup,
    /// The one invocation that steps the whole block, once for the scale and once to
    /// store it, with no barrier: software adapters, where barriers cost more than the
    /// second pass (BENCHMARKS.md, issue 26).
    Invocation,
}

impl BlockReduction {
    /// The reduction for a device on the adapter `info` describes.
    pub(crate) fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        if info.device_type == wgpu::DeviceType::Cpu {
            BlockReduction::Invocation
        } else {
            BlockReduction::Workgroup
        }
    }
}

/// The `BLOCK_SIZE` override of a slot format: its block size, or the largest (which
/// no code reads) for formats without blocks.
fn block_size(state: StateDtype) -> f64 {
    state.block_size().unwrap_or(MAX_BLOCK_SIZE) as f64
}

/// The override values of `variant` with int8 blocks reduced by `blocks`, named
/// through the contract (every override of [`contract::OVERRIDES`], in its order; a
/// unit test checks both).
pub(crate) fn constants(variant: &Variant, blocks: BlockReduction) -> Vec<(&'static str, f64)> {
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    let slot = |s: Slot| variant.slot_index(s).unwrap_or(0) as f64;
    let kernel = variant.kernel();
    // the structural flags, named once in math::KERNEL_FLAGS (in the contract's order)
    let flags = KERNEL_FLAGS
        .iter()
        .map(|&(bit, name)| (name, b(kernel & bit != 0)));
    flags
        .chain([
            (contract::WEIGHT_DECAY.name, b(variant.weight_decay)),
            (contract::GUARD.name, b(variant.guard)),
            (contract::LOSS_SCALING.name, b(variant.loss_scaling)),
            (contract::CLIP_KIND.name, f64::from(variant.clip.code())),
            (
                contract::GRADIENT_DTYPE.name,
                f64::from(variant.gradients.code()),
            ),
            (
                contract::PARAM_COPY.name,
                f64::from(variant.param_copy.map_or(0, |d| d.code())),
            ),
            (
                contract::PARAM_DTYPE.name,
                f64::from(variant.param_dtype_code()),
            ),
            (
                contract::PARAM_ROUNDING.name,
                b(variant.stochastic_rounding),
            ),
            (contract::MOMENTUM_SLOT.name, slot(Slot::Momentum)),
            (
                contract::AVERAGE_GRADIENT_SLOT.name,
                slot(Slot::AverageGradient),
            ),
            (contract::EMA_SLOT.name, slot(Slot::Ema)),
            (contract::ACCUMULATOR_SLOT.name, slot(Slot::Accumulator)),
            (contract::SLOT_COUNT.name, variant.slots().len() as f64),
            (contract::STATE_DTYPE.name, f64::from(variant.state.code())),
            (contract::STATE_ROUNDING.name, b(variant.state_stochastic)),
            (contract::BLOCK_SIZE.name, block_size(variant.state)),
            (contract::PARAM_GROUPS.name, b(variant.param_groups)),
            (
                contract::BLOCK_PER_INVOCATION.name,
                b(blocks == BlockReduction::Invocation),
            ),
        ])
        .collect()
}

/// Shader module, layouts and pipelines of one device.
#[derive(Default)]
pub(crate) struct PipelineCache {
    /// The device's int8 block reduction, which every pipeline is built with.
    pub(crate) blocks: BlockReduction,
    module: Option<wgpu::ShaderModule>,
    layouts: Option<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    by_variant: HashMap<Variant, Arc<Pipelines>>,
}

impl PipelineCache {
    /// An empty cache for a device whose int8 blocks `blocks` reduces.
    pub(crate) fn new(blocks: BlockReduction) -> Self {
        PipelineCache {
            blocks,
            ..PipelineCache::default()
        }
    }
}

/// The layout entry of one contract binding.
fn layout_entry(b: contract::Binding) -> wgpu::BindGroupLayoutEntry {
    let ty = match b.kind {
        BindingKind::Uniform => wgpu::BufferBindingType::Uniform,
        BindingKind::ReadOnlyStorage => wgpu::BufferBindingType::Storage { read_only: true },
        BindingKind::Storage => wgpu::BufferBindingType::Storage { read_only: false },
    };
    wgpu::BindGroupLayoutEntry {
        binding: b.number,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
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
                entries: &contract::BINDINGS.map(layout_entry),
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
        let constants = constants(variant, cache.blocks);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RmsPropConfig;
    use crate::dtype::Dtype;
    use crate::state::{StateDtype, StateStorage};

    /// The block sizes the WGSL's `BLOCK_SIZE` override takes are exactly those
    /// `StateStorage::validate` accepts (`state::MIN_BLOCK_SIZE` to `MAX_BLOCK_SIZE`).
    #[test]
    fn the_shader_takes_the_block_sizes_the_config_accepts() {
        use crate::state::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
        let accepted: Vec<f64> = (1..=4096usize)
            .filter(|&b| {
                StateStorage::new(StateDtype::Dynamic8 { block_size: b })
                    .validate()
                    .is_ok()
            })
            .map(|b| b as f64)
            .collect();
        assert_eq!(accepted, contract::BLOCK_SIZE.values);
        assert_eq!(accepted.first(), Some(&(MIN_BLOCK_SIZE as f64)));
        assert_eq!(accepted.last(), Some(&(MAX_BLOCK_SIZE as f64)));
    }

    /// The host gives every override of the contract, in its order, with one of the
    /// values the contract lists (which build.rs and the Tint check compile), for the
    /// variants of many configs.
    #[test]
    fn constants_follow_the_contract() {
        let mut variants = Vec::new();
        for k in 0..128usize {
            let mut c = RmsPropConfig::default().with_centered(k & 1 != 0);
            if k & 2 != 0 {
                c = c.with_momentum(0.5);
            }
            c = match (k >> 2) & 3 {
                1 => c.with_clipnorm(1.0),
                2 => c.with_global_clipnorm(1.0),
                3 => c.with_clipvalue(1.0),
                _ => c,
            };
            if k & 16 != 0 {
                c = c.with_use_ema(true);
            }
            if k & 32 != 0 {
                c = c.with_gradient_accumulation_steps(2);
            }
            if k & 64 != 0 {
                c = c.with_weight_decay(0.1);
                c.state = StateStorage::new(StateDtype::Dynamic8 { block_size: 32 });
            }
            let v = Variant::of(&c);
            if c.momentum > 0.0 && c.weight_decay.is_some() {
                // the other dialects' structure: nesterov, decay in the gradient
                let mut optax = c.clone();
                optax.dialect = crate::config::Dialect::Optax;
                optax.nesterov = true;
                let o = Variant::of(&optax);
                assert!(o.nesterov && o.coupled_decay);
                variants.push(o);
            }
            variants.push(v);
            variants.push(Variant {
                guard: true,
                loss_scaling: true,
                gradients: Dtype::F16,
                params: Dtype::Bf16,
                param_remainders: true,
                param_copy: Some(Dtype::Bf16),
                stochastic_rounding: true,
                ..v
            });
        }
        let reductions = [BlockReduction::Workgroup, BlockReduction::Invocation];
        for (v, blocks) in variants
            .into_iter()
            .flat_map(|v| reductions.map(|r| (v, r)))
        {
            let given = constants(&v, blocks);
            let names: Vec<&str> = given.iter().map(|(n, _)| *n).collect();
            let expected: Vec<&str> = contract::OVERRIDES.iter().map(|o| o.name).collect();
            assert_eq!(names, expected);
            for ((name, value), o) in given.iter().zip(contract::OVERRIDES) {
                assert!(o.values.contains(value), "{name} = {value} for {v:?}");
            }
        }
    }
}
