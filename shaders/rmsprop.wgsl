// Keras-exact RMSprop as fused compute kernels over a flat arena.
//
// Every function in the "update math" section mirrors, name for name, a function of
// src/math.rs (the one source of truth); tests/backend_parity.rs holds them together.
// Options that change the code path are `override` constants (one pipeline per
// combination, cached by the host); numbers that change per step are the plans in the
// uniform `step`, copied into the private `s` at the start of each entry point.
//
// Entry points, at most three dispatch kinds per step:
//   norm_partials  - one workgroup per chunk: sum of squared effective gradients (and,
//                    with GUARD, whether any gradient is NaN or infinite)
//   norm_finalize  - one workgroup: per-tensor sums in chunk order, clip factors (and,
//                    with GUARD, the decision to apply or skip the step)
//   update         - one workgroup per chunk: the fused update of every element
//
// The non-finite guard (GUARD, opt-in): the step counter lives on the device, in
// `guard`. The host cannot know it without a readback, so it writes the plans for every
// counter value the device may have reached (a window starting at the last counter it
// read back); norm_finalize picks the plan for the device's counter, or skips the step
// (parameters, slots and counter untouched) and counts it.

override CENTERED: bool = false;
override USE_MOMENTUM: bool = false;
override USE_EMA: bool = false;
override ACCUMULATE: bool = false;
override WEIGHT_DECAY: bool = false;
// Skip steps whose gradients hold NaN or an infinity (see the header).
override GUARD: bool = false;
// 0: none, 1: clipnorm (per tensor), 2: global_clipnorm, 3: clipvalue
override CLIP_KIND: u32 = 0u;
// Slot k of local element i lives at slots[k * segment_len + i]; velocity is slot 0.
override MOMENTUM_SLOT: u32 = 1u;
override AVERAGE_GRADIENT_SLOT: u32 = 2u;
override EMA_SLOT: u32 = 3u;
override ACCUMULATOR_SLOT: u32 = 4u;

const WORKGROUP_SIZE: u32 = 256u;
// Plans in the uniform's window: gpu::pipelines::PLAN_WINDOW.
const PLAN_WINDOW: u32 = 64u;
const FLAG_HAS_GRADIENT: u32 = 1u;
const FLAG_DECAY: u32 = 2u;

// Mirrors math::StepScalars (first 12 fields) and plan::StepPlan::uniform_words.
struct StepScalars {
    learning_rate: f32,
    rho: f32,
    one_minus_rho: f32,
    epsilon: f32,
    momentum: f32,
    weight_decay: f32,
    loss_scale: f32,
    accumulation_steps: f32,
    clip_value: f32,
    ema_momentum: f32,
    ema_overwrite: f32,
    ema_overwrite_enabled: f32,
    clip_norm: f32,
    inv_clip_norm: f32,
    is_update_step: f32,
    pad: f32,
}

// plans[k] is the plan for step counter `base + k` (low 32 bits: `base_lo`); without
// GUARD only plans[0] is written and used.
struct StepUniform {
    base_lo: u32,
    len: u32,
    tensor_count: u32,
    pad: u32,
    plans: array<StepScalars, PLAN_WINDOW>,
}

// The device-side counters of the guard; mirrored by gpu::guard::GuardWords.
struct GuardState {
    counter_lo: u32,
    counter_hi: u32,
    skipped_lo: u32,
    skipped_hi: u32,
    // set by norm_partials when a gradient is not finite, cleared by norm_finalize
    non_finite: atomic<u32>,
    // the plan the update uses this step, and whether it skips
    active_plan: u32,
    skip: u32,
    // set when the device counter fell outside the host's window (a host bug)
    fault: u32,
}

// One row of the chunk table: a piece of one tensor inside this segment.
struct Chunk {
    tensor: u32,
    start: u32,        // first element, local to the segment
    len: u32,
    global_index: u32, // index in the model-wide chunk table (for partials)
}

// One row of the offset table, as the kernels need it.
struct TensorInfo {
    first_chunk: u32,
    chunk_count: u32,
    flags: u32,
    pad: u32,
}

// Mirrors math::ClipFactors.
struct ClipFactors {
    numerator: f32,
    denominator: f32,
}

@group(0) @binding(0) var<uniform> step: StepUniform;
@group(0) @binding(1) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(2) var<storage, read> tensors: array<TensorInfo>;
@group(0) @binding(3) var<storage, read_write> params: array<f32>;
@group(0) @binding(4) var<storage, read> grads: array<f32>;
@group(0) @binding(5) var<storage, read_write> slots: array<f32>;
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;
@group(0) @binding(7) var<storage, read_write> clips: array<ClipFactors>;
@group(0) @binding(8) var<storage, read_write> guard: GuardState;

// This invocation's plan, loaded from `step` at the start of each entry point.
var<private> s: StepScalars;

var<workgroup> scratch: array<f32, WORKGROUP_SIZE>;

// ---- update math: mirrors src/math.rs ----------------------------------------

// Shader compilers may assume IEEE special values never occur and fold `x != x` or
// `x - x`; Keras' NaN propagation is kept with tests on the bits instead.
const F32_EXPONENT_BITS: u32 = 0x7f800000u;
const F32_QUIET_NAN_BITS: u32 = 0x7fc00000u;

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > F32_EXPONENT_BITS;
}

fn is_non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & F32_EXPONENT_BITS) == F32_EXPONENT_BITS;
}

fn nan_max(a: f32, b: f32) -> f32 {
    return select(max(a, b), bitcast<f32>(F32_QUIET_NAN_BITS), is_nan(a) || is_nan(b));
}

fn nan_min(a: f32, b: f32) -> f32 {
    return select(min(a, b), bitcast<f32>(F32_QUIET_NAN_BITS), is_nan(a) || is_nan(b));
}

fn clipnorm_factors(sum_sq: f32, clipnorm: f32) -> ClipFactors {
    let l2norm = select(sum_sq, sqrt(sum_sq), sum_sq > 0.0);
    return ClipFactors(clipnorm, nan_max(l2norm, clipnorm));
}

// Keras: clip * min(1 / norm, 1 / clip) + (norm - norm); the last term is 0 for a
// finite norm and NaN otherwise, written here as a bit test.
fn global_clipnorm_factors(total_sum_sq: f32, clip: f32, inv_clip: f32) -> ClipFactors {
    let use_norm = sqrt(total_sum_sq);
    let scale_for_finite = clip * nan_min(1.0 / use_norm, inv_clip);
    let scale = select(scale_for_finite, bitcast<f32>(F32_QUIET_NAN_BITS), is_non_finite(use_norm));
    return ClipFactors(scale, 1.0);
}

fn unscale_gradient(raw: f32) -> f32 {
    return raw / s.loss_scale;
}

fn accumulate_gradient(gradient: f32, accumulator: f32) -> f32 {
    return gradient + accumulator;
}

fn average_accumulated(gradient: f32, accumulator: f32) -> f32 {
    return (gradient + accumulator) / s.accumulation_steps;
}

fn clip_gradient(gradient: f32, clip: ClipFactors) -> f32 {
    let g = (gradient * clip.numerator) / clip.denominator;
    if CLIP_KIND == 3u {
        return select(clamp(g, -s.clip_value, s.clip_value), g, is_nan(g));
    }
    return g;
}

fn decay_weight(param: f32) -> f32 {
    return param - param * s.weight_decay * s.learning_rate;
}

fn rmsprop_velocity(velocity: f32, gradient: f32) -> f32 {
    return s.rho * velocity + s.one_minus_rho * (gradient * gradient);
}

fn rmsprop_average_gradient(average: f32, gradient: f32) -> f32 {
    return s.rho * average + s.one_minus_rho * gradient;
}

fn rmsprop_denominator(velocity: f32, average: f32) -> f32 {
    if CENTERED {
        return velocity - average * average + s.epsilon;
    }
    return velocity + s.epsilon;
}

fn rmsprop_increment(gradient: f32, denominator: f32) -> f32 {
    return (s.learning_rate * gradient) / sqrt(denominator);
}

fn rmsprop_momentum(momentum: f32, increment: f32) -> f32 {
    return s.momentum * momentum + increment;
}

fn ema_update(ema: f32, param: f32) -> f32 {
    return s.ema_momentum * ema + (1.0 - s.ema_momentum) * param;
}

fn ema_overwrite(param: f32, ema: f32) -> f32 {
    return ema * s.ema_overwrite + param * (1.0 - s.ema_overwrite);
}

// ---- arena access --------------------------------------------------------------

fn slot_index(slot: u32, i: u32) -> u32 {
    return slot * arrayLength(&params) + i;
}

// The gradient after unscaling and (on an update step) accumulation.
fn effective_gradient(i: u32) -> f32 {
    var g = unscale_gradient(grads[i]);
    if ACCUMULATE {
        g = average_accumulated(g, slots[slot_index(ACCUMULATOR_SLOT, i)]);
    }
    return g;
}

// Mirrors math::rmsprop_element, with the slots in the arena.
fn rmsprop_element(param: f32, gradient: f32, i: u32) -> f32 {
    let v = slot_index(0u, i);
    let velocity = rmsprop_velocity(slots[v], gradient);
    slots[v] = velocity;
    var average = 0.0;
    if CENTERED {
        let a = slot_index(AVERAGE_GRADIENT_SLOT, i);
        average = rmsprop_average_gradient(slots[a], gradient);
        slots[a] = average;
    }
    let increment = rmsprop_increment(gradient, rmsprop_denominator(velocity, average));
    if USE_MOMENTUM {
        let m = slot_index(MOMENTUM_SLOT, i);
        let momentum = rmsprop_momentum(slots[m], increment);
        slots[m] = momentum;
        return param - momentum;
    }
    return param - increment;
}

fn workgroup_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Sum of `value` over the workgroup in a fixed tree order (deterministic); every
// invocation gets the total. Call from uniform control flow only.
fn workgroup_sum(lid: u32, value: f32) -> f32 {
    scratch[lid] = value;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            scratch[lid] += scratch[lid + stride];
        }
        workgroupBarrier();
    }
    let total = scratch[0];
    workgroupBarrier();
    return total;
}

// ---- entry points ----------------------------------------------------------------

// (lo, hi) + 1 for a 64-bit counter held in two words.
fn increment(lo_hi: vec2<u32>) -> vec2<u32> {
    let lo = lo_hi.x + 1u;
    return vec2(lo, lo_hi.y + select(0u, 1u, lo == 0u));
}

// The guard's decision, made once per step by one invocation: apply the plan for the
// device's counter and advance it, or skip the step and count the skip.
fn settle_guard() {
    let non_finite = atomicExchange(&guard.non_finite, 0u) != 0u;
    let index = guard.counter_lo - step.base_lo;
    if index >= step.len {
        guard.fault = 1u;
        guard.skip = 1u;
    } else if non_finite {
        guard.skip = 1u;
        let skipped = increment(vec2(guard.skipped_lo, guard.skipped_hi));
        guard.skipped_lo = skipped.x;
        guard.skipped_hi = skipped.y;
    } else {
        guard.skip = 0u;
        guard.active_plan = index;
        let counter = increment(vec2(guard.counter_lo, guard.counter_hi));
        guard.counter_lo = counter.x;
        guard.counter_hi = counter.y;
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // only step-invariant fields are read here (loss scale, accumulation steps)
    s = step.plans[0];
    let c = workgroup_linear(wid, nwg);
    let valid = c < arrayLength(&chunks);
    let chunk = chunks[min(c, arrayLength(&chunks) - 1u)];
    var sum = 0.0;
    var non_finite = false;
    if valid && (tensors[chunk.tensor].flags & FLAG_HAS_GRADIENT) != 0u {
        for (var k = lid; k < chunk.len; k += WORKGROUP_SIZE) {
            let i = chunk.start + k;
            if GUARD {
                non_finite = non_finite | is_non_finite(unscale_gradient(grads[i]));
            }
            if CLIP_KIND == 1u || CLIP_KIND == 2u {
                let g = effective_gradient(i);
                sum += g * g;
            }
        }
    }
    // rare (a bad step), so one atomic per invocation that saw one is cheap enough
    if non_finite {
        atomicOr(&guard.non_finite, 1u);
    }
    // without norm clipping (the guard alone) there is nothing to sum: no barriers
    if CLIP_KIND == 1u || CLIP_KIND == 2u {
        let total = workgroup_sum(lid, sum);
        if valid && lid == 0u {
            partials[chunk.global_index] = total;
        }
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_finalize(@builtin(local_invocation_index) lid: u32) {
    // only step-invariant fields are read here (clip thresholds)
    s = step.plans[0];
    if CLIP_KIND == 1u || CLIP_KIND == 2u {
        var present_sum = 0.0;
        for (var t = lid; t < step.tensor_count; t += WORKGROUP_SIZE) {
            let info = tensors[t];
            var sum = 0.0;
            for (var k = 0u; k < info.chunk_count; k++) {
                sum += partials[info.first_chunk + k];
            }
            if CLIP_KIND == 1u {
                clips[t] = clipnorm_factors(sum, s.clip_norm);
            }
            if (info.flags & FLAG_HAS_GRADIENT) != 0u {
                present_sum += sum;
            }
        }
        if CLIP_KIND == 2u {
            let total = workgroup_sum(lid, present_sum);
            let factors = global_clipnorm_factors(total, s.clip_norm, s.inv_clip_norm);
            for (var t = lid; t < step.tensor_count; t += WORKGROUP_SIZE) {
                clips[t] = factors;
            }
        }
    }
    if GUARD && lid == 0u {
        settle_guard();
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn update(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = workgroup_linear(wid, nwg);
    if c >= arrayLength(&chunks) {
        return;
    }
    if GUARD {
        if guard.skip != 0u {
            return;
        }
        s = step.plans[guard.active_plan];
    } else {
        s = step.plans[0];
    }
    let chunk = chunks[c];
    let flags = tensors[chunk.tensor].flags;
    let has_gradient = (flags & FLAG_HAS_GRADIENT) != 0u;
    let decay = WEIGHT_DECAY && (flags & FLAG_DECAY) != 0u;
    let update_step = s.is_update_step != 0.0;
    let overwrite = s.ema_overwrite_enabled != 0.0;
    if !has_gradient && !USE_EMA {
        return;
    }
    var clip = ClipFactors(1.0, 1.0);
    if CLIP_KIND == 1u || CLIP_KIND == 2u {
        clip = clips[chunk.tensor];
    }
    for (var k = lid; k < chunk.len; k += WORKGROUP_SIZE) {
        let i = chunk.start + k;
        var p = params[i];
        if has_gradient {
            if ACCUMULATE && !update_step {
                let a = slot_index(ACCUMULATOR_SLOT, i);
                slots[a] = accumulate_gradient(unscale_gradient(grads[i]), slots[a]);
            } else {
                var g = unscale_gradient(grads[i]);
                if ACCUMULATE {
                    let a = slot_index(ACCUMULATOR_SLOT, i);
                    g = average_accumulated(g, slots[a]);
                    slots[a] = 0.0;
                }
                g = clip_gradient(g, clip);
                if decay {
                    p = decay_weight(p);
                }
                p = rmsprop_element(p, g, i);
            }
        }
        if USE_EMA {
            let e = slot_index(EMA_SLOT, i);
            let ema = ema_update(slots[e], p);
            slots[e] = ema;
            if overwrite {
                p = ema_overwrite(p, ema);
            }
        }
        params[i] = p;
    }
}
