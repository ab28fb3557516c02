//! The CPU driver: parameters and slots in flat host arenas, one step as (at most) a
//! parallel norm reduction and one fused parallel pass over the chunk table.
//!
//! The inner loops call the functions of [`crate::math`] (mirrored by
//! `shaders/rmsprop.wgsl`); the structural options are const generics, so every
//! variant compiles to its own branch-free, vectorizable loop. This module never
//! touches wgpu.

use rayon::prelude::*;

use crate::layout::{Chunk, Layout, VariableSpec};
use crate::math::{
    accumulate_gradient, average_accumulated, clip_gradient, clipnorm_factors, decay_weight,
    ema_overwrite, ema_update, global_clipnorm_factors, rmsprop_element, unscale_gradient,
    ClipFactors, ElementSlots, StepScalars,
};
use crate::plan::{ClipKind, StepPlan, Variant};

/// Elements per chunk on the CPU: 128 KiB of each array, large enough to amortize
/// scheduling, small enough to balance across threads.
pub const CPU_CHUNK_LEN: usize = 1 << 15;

/// Parameters and slots of a model in host memory.
#[derive(Debug, Clone)]
pub struct CpuEngine {
    layout: Layout,
    variant: Variant,
    params: Vec<f32>,
    velocity: Vec<f32>,
    momentum: Vec<f32>,
    average_gradient: Vec<f32>,
    ema: Vec<f32>,
    accumulator: Vec<f32>,
}

/// The slices one chunk works on.
struct ChunkJob<'a> {
    param: &'a mut [f32],
    grad: Option<&'a [f32]>,
    velocity: &'a mut [f32],
    momentum: &'a mut [f32],
    average_gradient: &'a mut [f32],
    ema: &'a mut [f32],
    accumulator: &'a mut [f32],
    decay: bool,
    clip: ClipFactors,
}

/// Cuts `buf` into the chunks' pieces; an unused (empty) slot gives empty pieces.
fn split_chunks<'a>(buf: &'a mut [f32], chunks: &[Chunk]) -> Vec<&'a mut [f32]> {
    if buf.is_empty() {
        return chunks.iter().map(|_| Default::default()).collect();
    }
    let mut rest = buf;
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(c.len);
        out.push(head);
        rest = tail;
    }
    out
}

fn zeros(used: bool, n: usize) -> Vec<f32> {
    if used {
        vec![0.0; n]
    } else {
        Vec::new()
    }
}

impl CpuEngine {
    /// Zeroed parameters and slots for `specs`.
    pub fn new(specs: &[VariableSpec], variant: Variant) -> crate::Result<Self> {
        let layout = Layout::new(specs, CPU_CHUNK_LEN, usize::MAX)?;
        let n = layout.total();
        Ok(CpuEngine {
            params: vec![0.0; n],
            velocity: vec![0.0; n],
            momentum: zeros(variant.momentum, n),
            average_gradient: zeros(variant.centered, n),
            ema: zeros(variant.ema, n),
            accumulator: zeros(variant.accumulate, n),
            layout,
            variant,
        })
    }

    /// The arena layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The whole parameter arena.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The whole parameter arena, writable.
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// A slot arena by Keras name (`velocity`, `momentum`, `average_gradient`,
    /// `average` for the EMA, `accumulated_gradient`); `None` when the variant keeps none.
    pub fn slot(&self, name: &str) -> Option<&[f32]> {
        let s = match name {
            "velocity" => &self.velocity,
            "momentum" if self.variant.momentum => &self.momentum,
            "average_gradient" if self.variant.centered => &self.average_gradient,
            "average" if self.variant.ema => &self.ema,
            "accumulated_gradient" if self.variant.accumulate => &self.accumulator,
            _ => return None,
        };
        Some(s)
    }

    /// A slot arena by Keras name, writable.
    pub fn slot_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let v = self.variant;
        let s = match name {
            "velocity" => &mut self.velocity,
            "momentum" if v.momentum => &mut self.momentum,
            "average_gradient" if v.centered => &mut self.average_gradient,
            "average" if v.ema => &mut self.ema,
            "accumulated_gradient" if v.accumulate => &mut self.accumulator,
            _ => return None,
        };
        Some(s)
    }

    /// `finalize_variable_values`: copies the EMA into the parameters (no-op without EMA).
    pub(crate) fn finalize(&mut self) {
        if self.variant.ema {
            self.params.copy_from_slice(&self.ema);
        }
    }

    /// Per-tensor sums of squared effective gradients, when this step clips by a norm.
    fn norm_sums(&self, plan: &StepPlan, grads: &[Option<&[f32]>]) -> Option<Vec<f64>> {
        if !self.variant.clip.needs_norm() || !plan.is_update_step {
            return None;
        }
        let tensors = self.layout.tensors();
        let s = &plan.scalars;
        let acc = &self.accumulator;
        let accumulate = self.variant.accumulate;
        let partials: Vec<f64> = self
            .layout
            .chunks()
            .par_iter()
            .map(|c| {
                let t = &tensors[c.tensor];
                let Some(g) = grads[c.tensor] else { return 0.0 };
                let g = &g[c.offset - t.offset..][..c.len];
                let a = if accumulate {
                    &acc[c.offset..][..c.len]
                } else {
                    &[][..]
                };
                sum_of_squares(g, a, s)
            })
            .collect();
        Some(
            tensors
                .iter()
                .map(|t| {
                    partials[t.first_chunk..t.first_chunk + t.chunk_count]
                        .iter()
                        .sum()
                })
                .collect(),
        )
    }

    /// Per-tensor clip factors from the norm sums (no clipping by norm: none).
    fn clip_factors(&self, plan: &StepPlan, sums: Option<&[f64]>) -> Vec<ClipFactors> {
        let n = self.layout.tensors().len();
        let Some(sums) = sums else {
            return vec![ClipFactors::NONE; n];
        };
        match self.variant.clip {
            ClipKind::Norm => sums
                .iter()
                .map(|&ss| clipnorm_factors(ss as f32, plan.clip_norm))
                .collect(),
            _ => {
                let total: f64 = sums.iter().sum();
                let f = global_clipnorm_factors(total as f32, plan.clip_norm, plan.inv_clip_norm);
                vec![f; n]
            }
        }
    }

    /// One optimizer step. `grads` has one entry per tensor (checked by the caller:
    /// lengths match, at least one is present); `decay[t]` says whether tensor `t`
    /// takes weight decay. With `guard`, a step whose gradients are not all finite
    /// changes nothing and returns false.
    pub(crate) fn step(
        &mut self,
        plan: &StepPlan,
        grads: &[Option<&[f32]>],
        decay: &[bool],
        guard: bool,
    ) -> bool {
        let sums = self.norm_sums(plan, grads);
        if guard {
            // NaN or infinity in a gradient makes its sum of squares non-finite, so a
            // finite sum proves the step clean; a non-finite one may be a finite
            // overflow, which the exact scan tells apart.
            let proven_finite = sums
                .as_ref()
                .is_some_and(|s| s.iter().all(|x| x.is_finite()));
            if !proven_finite && has_non_finite(grads, &plan.scalars) {
                return false;
            }
        }
        let clips = self.clip_factors(plan, sums.as_deref());
        let tensors = self.layout.tensors();
        let chunks = self.layout.chunks();
        let mut params = split_chunks(&mut self.params, chunks).into_iter();
        let mut vel = split_chunks(&mut self.velocity, chunks).into_iter();
        let mut mom = split_chunks(&mut self.momentum, chunks).into_iter();
        let mut avg = split_chunks(&mut self.average_gradient, chunks).into_iter();
        let mut ema = split_chunks(&mut self.ema, chunks).into_iter();
        let mut acc = split_chunks(&mut self.accumulator, chunks).into_iter();
        let mut jobs = Vec::with_capacity(chunks.len());
        for c in chunks {
            let t = &tensors[c.tensor];
            let (
                Some(param),
                Some(velocity),
                Some(momentum),
                Some(average_gradient),
                Some(e),
                Some(a),
            ) = (
                params.next(),
                vel.next(),
                mom.next(),
                avg.next(),
                ema.next(),
                acc.next(),
            )
            else {
                break;
            };
            jobs.push(ChunkJob {
                param,
                grad: grads[c.tensor].map(|g| &g[c.offset - t.offset..][..c.len]),
                velocity,
                momentum,
                average_gradient,
                ema: e,
                accumulator: a,
                decay: self.variant.weight_decay && decay[c.tensor],
                clip: clips[c.tensor],
            });
        }
        let s = plan.scalars;
        let update = plan.is_update_step;
        let v = self.variant;
        macro_rules! go {
            ($c:literal, $m:literal, $e:literal, $a:literal) => {
                jobs.into_par_iter()
                    .for_each(|job| run_chunk::<$c, $m, $e, $a>(job, &s, update))
            };
        }
        match (v.centered, v.momentum, v.ema, v.accumulate) {
            (false, false, false, false) => go!(false, false, false, false),
            (false, false, false, true) => go!(false, false, false, true),
            (false, false, true, false) => go!(false, false, true, false),
            (false, false, true, true) => go!(false, false, true, true),
            (false, true, false, false) => go!(false, true, false, false),
            (false, true, false, true) => go!(false, true, false, true),
            (false, true, true, false) => go!(false, true, true, false),
            (false, true, true, true) => go!(false, true, true, true),
            (true, false, false, false) => go!(true, false, false, false),
            (true, false, false, true) => go!(true, false, false, true),
            (true, false, true, false) => go!(true, false, true, false),
            (true, false, true, true) => go!(true, false, true, true),
            (true, true, false, false) => go!(true, true, false, false),
            (true, true, false, true) => go!(true, true, false, true),
            (true, true, true, false) => go!(true, true, true, false),
            (true, true, true, true) => go!(true, true, true, true),
        }
        true
    }
}

/// True when any present gradient, divided by the loss scale, is NaN or infinite.
pub fn has_non_finite(grads: &[Option<&[f32]>], scalars: &StepScalars) -> bool {
    grads.par_iter().flatten().any(|g| {
        g.par_chunks(CPU_CHUNK_LEN).any(|chunk| {
            // a fold rather than a short-circuit, so the loop vectorizes
            chunk.iter().fold(false, |bad, &x| {
                bad | !unscale_gradient(x, scalars).is_finite()
            })
        })
    })
}

/// Sum of squared effective gradients (unscaled, and averaged with the accumulator
/// when `acc` is non-empty): f32 squares summed in eight f32 lanes over blocks of 256
/// elements (so the loop vectorizes), blocks summed in f64.
fn sum_of_squares(g: &[f32], acc: &[f32], s: &StepScalars) -> f64 {
    const BLOCK: usize = 256;
    let lanes_sum = |lanes: [f32; 8]| lanes.iter().map(|&l| l as f64).sum::<f64>();
    let mut total = 0.0f64;
    if acc.is_empty() {
        for block in g.chunks(BLOCK) {
            let mut lanes = [0.0f32; 8];
            let mut it = block.chunks_exact(8);
            for c in &mut it {
                for k in 0..8 {
                    let e = unscale_gradient(c[k], s);
                    lanes[k] += e * e;
                }
            }
            for (k, &x) in it.remainder().iter().enumerate() {
                let e = unscale_gradient(x, s);
                lanes[k] += e * e;
            }
            total += lanes_sum(lanes);
        }
    } else {
        for (block, ablock) in g.chunks(BLOCK).zip(acc.chunks(BLOCK)) {
            let mut lanes = [0.0f32; 8];
            let mut it = block.chunks_exact(8).zip(ablock.chunks_exact(8));
            for (c, a) in &mut it {
                for k in 0..8 {
                    let e = average_accumulated(unscale_gradient(c[k], s), a[k], s);
                    lanes[k] += e * e;
                }
            }
            let done = block.len() / 8 * 8;
            for k in done..block.len() {
                let e = average_accumulated(unscale_gradient(block[k], s), ablock[k], s);
                lanes[k - done] += e * e;
            }
            total += lanes_sum(lanes);
        }
    }
    total
}

/// The fused per-chunk loop: unscale, accumulate, clip, decay, RMSprop, EMA.
/// `C` centered, `M` momentum, `E` EMA, `A` accumulation.
fn run_chunk<const C: bool, const M: bool, const E: bool, const A: bool>(
    job: ChunkJob<'_>,
    s: &StepScalars,
    update: bool,
) {
    let n = job.param.len();
    let param = job.param;
    let overwrite = s.ema_overwrite_enabled != 0.0;
    let mut ema_done = false;
    if let Some(grad) = job.grad {
        let grad = &grad[..n];
        let acc: &mut [f32] = if A {
            &mut job.accumulator[..n]
        } else {
            job.accumulator
        };
        if A && !update {
            for i in 0..n {
                acc[i] = accumulate_gradient(unscale_gradient(grad[i], s), acc[i]);
            }
        } else {
            let vel = &mut job.velocity[..n];
            let mom: &mut [f32] = if M {
                &mut job.momentum[..n]
            } else {
                job.momentum
            };
            let avg: &mut [f32] = if C {
                &mut job.average_gradient[..n]
            } else {
                job.average_gradient
            };
            let ema: &mut [f32] = if E { &mut job.ema[..n] } else { job.ema };
            for i in 0..n {
                let mut g = unscale_gradient(grad[i], s);
                if A {
                    g = average_accumulated(g, acc[i], s);
                    acc[i] = 0.0;
                }
                g = clip_gradient(g, job.clip, s);
                let mut p = param[i];
                if job.decay {
                    p = decay_weight(p, s);
                }
                let mut slots = ElementSlots {
                    velocity: vel[i],
                    momentum: if M { mom[i] } else { 0.0 },
                    average_gradient: if C { avg[i] } else { 0.0 },
                };
                p = rmsprop_element(p, g, &mut slots, C, M, s);
                vel[i] = slots.velocity;
                if M {
                    mom[i] = slots.momentum;
                }
                if C {
                    avg[i] = slots.average_gradient;
                }
                if E {
                    let e = ema_update(ema[i], p, s);
                    ema[i] = e;
                    if overwrite {
                        p = ema_overwrite(p, e, s);
                    }
                }
                param[i] = p;
            }
            ema_done = true;
        }
    }
    if E && !ema_done {
        let ema = &mut job.ema[..n];
        for i in 0..n {
            let e = ema_update(ema[i], param[i], s);
            ema[i] = e;
            if overwrite {
                param[i] = ema_overwrite(param[i], e, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan_step;
    use crate::RmsPropConfig;

    #[test]
    fn detects_nan_and_infinity_after_unscaling() {
        let s = plan_step(&RmsPropConfig::default(), 0).scalars;
        let fine = vec![1.0f32; 100_000];
        let mut bad = fine.clone();
        bad[77_777] = f32::NAN;
        assert!(!has_non_finite(&[Some(&fine), None], &s));
        assert!(has_non_finite(&[Some(&fine), Some(&bad)], &s));
        bad[77_777] = f32::NEG_INFINITY;
        assert!(has_non_finite(&[Some(&bad)], &s));
        // a finite gradient that overflows when unscaled counts as non-finite
        let tiny = RmsPropConfig::default().with_loss_scale_factor(1e-30);
        let s = plan_step(&tiny, 0).scalars;
        assert!(has_non_finite(&[Some(&[1e10f32][..])], &s));
        assert!(!has_non_finite(&[None, Some(&[][..])], &s));
    }
}
