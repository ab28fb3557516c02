// Keras-exact RMSprop as fused compute kernels over a flat arena.
//
// The "update math" section mirrors src/math.rs (the one source of truth) name for
// name and stage for stage: `update_element` is the whole step of one element, in
// Keras' order. The parity tests (tests/backend_parity.rs, the Keras traces on both
// backends) hold the two together. Every struct the host writes or reads is defined
// once on the host (src/gpu/shader.rs, and math::StepScalars), and a test compares
// the layouts through naga's reflection.
//
// Every element function works on `Lanes`, four consecutive elements of one tensor:
// tensors start at multiples of 4 (the host pads the arena to the device's binding
// alignment), so each `vec4<f32>` belongs to one tensor, and the lanes past a tensor's
// end (padding) are masked: their stored values are the values loaded.
//
// Options that change the code path are `override` constants (one pipeline per
// combination, cached by the host); numbers that change per step are the plans in the
// uniform `step`, copied into the private `s` at the start of each entry point.
//
// Bindings (the Rust side: src/gpu/contract.rs): two uniforms and four storage buffers
// in every mode, within WebGPU's downlevel limits. The per-step and per-tensor tables
// (chunk and tensor rows, clip factors, norm partials, code maps) and
// the device's step state share one `control` buffer; the parameters and gradients are
// read as words whatever their dtype; a segment's own arrays (f32 slots, compact
// slots, scales, the 16-bit copy, remainders) share one `state` buffer, in regions the
// segment uniform gives.
//
// Entry points, at most three dispatch kinds per step (and refresh_param_copy, outside
// steps, after the host writes parameters):
//   norm_partials  - one workgroup per chunk: sum of squared effective gradients (and,
//                    with GUARD, whether any gradient is NaN or infinite)
//   norm_finalize  - one workgroup: per-tensor sums in chunk order, clip factors (and,
//                    with GUARD, the decision to apply or skip the step)
//   update         - one workgroup per chunk: `update_element` on every element
//
// Loss scaling (LOSS_SCALING, Keras' LossScaleOptimizer) is decided the same way: the
// dynamic scale and its growth counter live in `control.step_state` too; norm_partials divides
// by the scale as it is, norm_finalize moves it on (next_loss_scale, mirroring
// math::next_loss_scale) after saving it in `active_scale` for the update.
//
// The non-finite guard (GUARD, opt-in): the step counter lives on the device, in
// `step_state`. The host cannot know it without a readback, so it writes the plans for
// every counter value the device may have reached (a window starting at the last
// counter it read back); norm_finalize picks the plan for the device's counter, or
// skips the step (parameters, slots and counter untouched) and counts it.

// The structural flags (math::kernel, paired with these names in math::KERNEL_FLAGS).
override CENTERED: bool = false;
override USE_MOMENTUM: bool = false;
// optax's nesterov (with USE_MOMENTUM): the parameter moves by increment + momentum * buffer.
override NESTEROV: bool = false;
override USE_EMA: bool = false;
override ACCUMULATE: bool = false;
// Weight decay as an L2 term of the gradient (PyTorch, Burn, optax) instead of Keras'
// decoupled decay of the parameter.
override COUPLED_DECAY: bool = false;
override WEIGHT_DECAY: bool = false;
// Skip steps whose gradients hold NaN or an infinity (see the header).
override GUARD: bool = false;
// Param groups: `update` reads each tensor's group and patches its numbers into the
// plan (without, it reads nothing).
override PARAM_GROUPS: bool = false;
// Keras' dynamic loss scaling (LossScaleOptimizer): skips non-finite steps as GUARD does,
// and divides the gradients by the device's dynamic scale (see the header).
override LOSS_SCALING: bool = false;
// 0: none, 1: clipnorm (per tensor), 2: global_clipnorm, 3: clipvalue
override CLIP_KIND: u32 = 0u;
// The gradients' element type (dtype::Dtype::code): 0 f32 (read from `grads`),
// 1 bf16, 2 f16 (two per u32, two Lanes per vec4 of `grads`; upcast exactly, as `half`
// does).
override GRADIENT_DTYPE: u32 = 0u;
// A 16-bit copy of the parameters written with them (dtype::Dtype::code): 0 none,
// 1 bf16, 2 f16, rounded to nearest, ties to even, as `half` rounds on the host.
override PARAM_COPY: u32 = 0u;
// How the parameters are stored (dtype::Dtype::code, math::STORE_*): 0 f32 (`params`),
// 1 bf16, 2 f16 (two per u32, two Lanes per vec4 of `params`; every assignment rounds:
// store_param), 3 bf16 plus a 16-bit remainder each (the `remainders` region of `state`)
// that make them exact f32 masters
// (the update is the f32 one).
override PARAM_DTYPE: u32 = 0u;
// 16-bit parameters: 0 round to nearest (ties to even), 1 round stochastically (keys from
// the plan's seed and step, the tensor and the element: math::element_key).
override PARAM_ROUNDING: u32 = 0u;
// Slot runs (Chunk::slot_run, SegmentUniform::codes): velocity is run 0, then these.
override MOMENTUM_SLOT: u32 = 1u;
override AVERAGE_GRADIENT_SLOT: u32 = 2u;
override EMA_SLOT: u32 = 3u;
override ACCUMULATOR_SLOT: u32 = 4u;
// Kept slots: each is a run of the `slots` buffer (and of the compact buffers).
override SLOT_COUNT: u32 = 1u;
// Compact slots of the chunks whose row says so (`state_format`): 1 bf16, 2 int8
// block-wise (quant.rs); STATE_ROUNDING 1 rounds bf16 slots stochastically.
override STATE_DTYPE: u32 = 0u;
override STATE_ROUNDING: u32 = 0u;
override BLOCK_SIZE: u32 = 256u;
// Who finds an int8 block's new scale: false, the BLOCK_SIZE / 4 invocations that step
// it, through workgroup memory and barriers; true, the one invocation that steps the
// whole block, in two passes and no barrier (software adapters, where a barrier costs
// more than stepping the block twice).
override BLOCK_PER_INVOCATION: bool = false;
// 1 when every code above is one this shader handles; otherwise its initializer divides
// by zero, which fails pipeline creation on every WGSL compiler: a new code must be
// handled here (and added to src/gpu/contract.rs) before it can run. Read by every
// entry point (check_codes).
override CODES_HANDLED: u32 = 1u / u32(CLIP_KIND <= 3u && GRADIENT_DTYPE <= 2u && PARAM_COPY <= 2u
    && PARAM_DTYPE <= 3u && PARAM_ROUNDING <= 1u && MOMENTUM_SLOT <= 4u
    && AVERAGE_GRADIENT_SLOT <= 4u && EMA_SLOT <= 4u && ACCUMULATOR_SLOT <= 4u
    && SLOT_COUNT >= 1u && SLOT_COUNT <= 5u && STATE_DTYPE <= 2u && STATE_ROUNDING <= 1u
    && BLOCK_SIZE >= 32u && BLOCK_SIZE <= 256u && (BLOCK_SIZE & (BLOCK_SIZE - 1u)) == 0u);

const WORKGROUP_SIZE: u32 = 256u;
const PLAN_WINDOW: u32 = 64u;
// TensorRow::flags bits
const FLAG_HAS_GRADIENT: u32 = 1u;
const FLAG_DECAY: u32 = 2u;
const FLAG_FROZEN: u32 = 4u;
// math::Phase
const PHASE_NO_GRADIENT: u32 = 0u;
const PHASE_ACCUMULATE: u32 = 1u;
const PHASE_UPDATE: u32 = 2u;
const PHASE_FROZEN: u32 = 3u;

// math::StepScalars
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
    clip_norm: f32,
    inv_clip_norm: f32,
    ema_momentum: f32,
    ema_overwrite: f32,
    ema_overwrite_enabled: u32,
    is_update_step: u32,
    // the CPU's parameter storage (the shader has PARAM_DTYPE, PARAM_ROUNDING)
    param_storage: u32,
    rounding_seed: u32,
    rounding_step: u32,
    state_seed: u32,
    increment_scale: f32,
    update_scale: f32,
    epsilon_outside: f32,
    bias_correction: f32,
    inverse_bias_correction: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    gradient_sign: f32,
}

// gpu::shader::StepUniform: plans[k] is the plan for step counter `base + k` (low 32
// bits: `base_lo`); without GUARD only plans[0] is written and used.
struct StepUniform {
    base_lo: u32,
    len: u32,
    tensor_count: u32,
    // dynamic_growth_steps of loss scaling
    growth_steps: u32,
    plans: array<StepScalars, PLAN_WINDOW>,
}

// gpu::shader::StepState: the device-side counters of the guard and this step's decision.
struct StepState {
    counter_lo: u32,
    counter_hi: u32,
    skipped_lo: u32,
    skipped_hi: u32,
    // the plan the update uses this step, and whether it skips
    active_plan: u32,
    skip: u32,
    // set when the device counter fell outside the host's window (a host bug)
    fault: u32,
    // loss scaling: the scale (f32 bits) the next step divides by, finite steps in a row
    // since it last changed, and the scale this step's update divides by
    loss_scale: u32,
    growth_counter: u32,
    active_scale: u32,
    // set by norm_partials when a gradient is not finite, cleared by norm_finalize
    non_finite: atomic<u32>,
    _pad: u32,
}

// gpu::shader::ChunkRow: a piece of one tensor inside this segment (a row of the
// chunk table in `control`).
struct ChunkRow {
    tensor: u32,
    start: u32,        // first element, local to the segment
    len: u32,
    tensor_start: u32, // index of the first element in its tensor
    state_at: u32,     // first element in the segment's store of its state format
    state_format: u32, // 0 f32 (the f32 slot runs), 1 bf16 or 2 int8 (the code runs)
}

// A chunk as the kernels use it: its row, and the segment's regions in `state` (from
// the segment uniform, read once per invocation into the value the element loops pass
// around, which compilers keep in registers).
struct Chunk {
    tensor: u32,
    start: u32,
    len: u32,
    tensor_start: u32,
    state_at: u32,
    state_format: u32,
    slot_run: u32,      // vec4s per f32 slot run (the f32 runs start the buffer)
    copy_at: u32,       // the 16-bit parameter copy
    remainders_at: u32, // the remainders
    codes: u32,         // compact runs and scales, in words (SegmentUniform)
    code_run: u32,
    absmax: u32,
    absmax_run: u32,
}

// The number of u32 words of a chunk row and a tensor row in the control tables.
const CHUNK_ROW_WORDS: u32 = 6u;
const TENSOR_ROW_WORDS: u32 = 4u;
// The words of TensorRow::flags and TensorRow::group in their row.
const TENSOR_FLAGS_WORD: u32 = 2u;
const TENSOR_GROUP_WORD: u32 = 3u;
// The number of u32 words of a row of the group table.
const GROUP_ROW_WORDS: u32 = 12u;

// gpu::shader::TensorRow: one row of the offset table.
struct TensorRow {
    first_chunk: u32,
    chunk_count: u32,
    flags: u32,
    // 0: the plan's numbers; g: the group table's row g - 1
    group: u32,
}

// math::GroupScalars: the numbers a param group changes (with_group puts them into
// the plan), read from the group table.
struct GroupScalars {
    learning_rate: f32,
    rho: f32,
    one_minus_rho: f32,
    epsilon: f32,
    epsilon_outside: f32,
    momentum: f32,
    weight_decay: f32,
    increment_scale: f32,
    update_scale: f32,
    bias_correction: f32,
    inverse_bias_correction: f32,
    _pad: u32,
}

// math::ClipFactors
struct ClipFactors {
    numerator: f32,
    denominator: f32,
}

// math::TensorStep
struct TensorStep {
    phase: u32,
    decay: bool,
    clip: ClipFactors,
}

// math::LossScaleState
struct LossScaleState {
    scale: f32,
    counter: u32,
}

// Four consecutive elements of one tensor.
alias Lanes = vec4<f32>;

// math::ElementState, four elements at a time
struct ElementState {
    param: Lanes,
    velocity: Lanes,
    momentum: Lanes,
    average_gradient: Lanes,
    ema: Lanes,
    accumulator: Lanes,
}

// gpu::shader::SegmentUniform: what one segment's dispatches need to find their
// rows and regions: the tables in u32 words from the start of `control.words`, the
// regions from the start of the segment's `state` binding (in vec4s for the f32 runs,
// the copy and the remainders, in words for the compact runs). Written once per arena.
struct SegmentUniform {
    // this segment's chunks: chunk rows first_chunk .. first_chunk + chunk_count
    first_chunk: u32,
    chunk_count: u32,
    tensor_rows: u32,
    chunk_rows: u32,
    clips: u32,
    partials: u32,
    code_maps: u32,
    // the group table: PLAN_WINDOW rows of group_count GroupScalars
    groups: u32,
    // vec4s per f32 slot run (the f32 runs start `state`), the 16-bit parameter copy
    // and the remainders (their first vec4)
    slot_run: u32,
    copy_at: u32,
    remainders_at: u32,
    // param groups with a row (group 0, the plan's own numbers, has none)
    group_count: u32,
    // compact slots: SLOT_COUNT runs of code_run words (bf16 two per word, int8 four)
    codes: u32,
    code_run: u32,
    // int8 blocks' scales (f32 bits): SLOT_COUNT runs of absmax_run words
    absmax: u32,
    absmax_run: u32,
}

// The control buffer, one per model: the device's step state, then the tables (chunk
// rows, tensor rows, clip factors, norm partials per chunk, the code maps) at the word
// offsets the segment uniform gives.
struct Control {
    step_state: StepState,
    words: array<u32>,
}

// Four storage buffers per segment in every mode (WebGPU's downlevel limit): every data
// array is read as `vec4<u32>` words and converted by the dtype overrides.
@group(0) @binding(0) var<uniform> step: StepUniform;
@group(0) @binding(1) var<uniform> segment: SegmentUniform;
@group(0) @binding(2) var<storage, read_write> control: Control;
// The parameters: f32 (one vec4 of words per Lanes) or 16-bit (two Lanes per vec4).
@group(0) @binding(3) var<storage, read_write> params: array<vec4<u32>>;
// The gradients in GRADIENT_DTYPE, packed as the parameters are.
@group(0) @binding(4) var<storage, read> grads: array<vec4<u32>>;
// The segment's own arrays (see SegmentUniform): slots, compact slots and their
// scales, the parameter copy, the remainders.
@group(0) @binding(5) var<storage, read_write> state: array<vec4<u32>>;

// This invocation's plan, loaded from `step` at the start of each entry point.
var<private> s: StepScalars;
var<workgroup> scratch: array<f32, WORKGROUP_SIZE>;
var<workgroup> block_scales: array<vec4<f32>, WORKGROUP_SIZE>;
var<workgroup> uniform_word: u32;
// WORKGROUP_SIZE = REDUCE_WIDTH * REDUCE_WIDTH
const REDUCE_WIDTH: u32 = 16u;
var<workgroup> scratch_partials: array<f32, REDUCE_WIDTH>;

// ---- update math: mirrors src/math.rs ----------------------------------------

// Shader compilers may assume IEEE special values never occur and fold `x != x` or
// `x - x`; Keras' NaN propagation is kept with tests on the bits instead.
const F32_EXPONENT_BITS: u32 = 0x7f800000u;
// The WGSL spec makes a NaN computed by a const-expression a shader-creation error
// (Tint enforces it; naga does not), so the quiet NaN is built at run time from a
// private variable's value.
const F32_QUIET_NAN_BITS: u32 = 0x7fc00000u;

fn quiet_nan() -> f32 {
    // `& 0u` of a run-time value: not a const-expression, and no private variable
    return bitcast<f32>(F32_QUIET_NAN_BITS | (s.is_update_step & 0u));
}

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > F32_EXPONENT_BITS;
}

fn is_non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & F32_EXPONENT_BITS) == F32_EXPONENT_BITS;
}

fn nan_max(a: f32, b: f32) -> f32 {
    return select(max(a, b), quiet_nan(), is_nan(a) || is_nan(b));
}

fn nan_min(a: f32, b: f32) -> f32 {
    return select(min(a, b), quiet_nan(), is_nan(a) || is_nan(b));
}

fn lanes_nan(x: Lanes) -> vec4<bool> {
    return (bitcast<vec4<u32>>(x) & vec4(0x7fffffffu)) > vec4(F32_EXPONENT_BITS);
}

fn lanes_non_finite(x: Lanes) -> vec4<bool> {
    return (bitcast<vec4<u32>>(x) & vec4(F32_EXPONENT_BITS)) == vec4(F32_EXPONENT_BITS);
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
    let scale = select(scale_for_finite, quiet_nan(), is_non_finite(use_norm));
    return ClipFactors(scale, 1.0);
}

fn next_loss_scale(state: LossScaleState, finite: bool, growth_steps: u32) -> LossScaleState {
    if !finite {
        return LossScaleState(state.scale / 2.0, 0u);
    } else if state.counter == growth_steps - 1u {
        return LossScaleState(state.scale * 2.0, 0u);
    }
    return LossScaleState(state.scale, state.counter + 1u);
}

fn phase_of(has_gradient: bool, frozen: bool) -> u32 {
    if frozen {
        return PHASE_FROZEN;
    }
    if !has_gradient {
        return PHASE_NO_GRADIENT;
    }
    return select(PHASE_UPDATE, PHASE_ACCUMULATE, s.is_update_step == 0u);
}

// The plan for a tensor of a param group: the plan with the group's numbers.
fn with_group(plan: StepScalars, g: GroupScalars) -> StepScalars {
    var out = plan;
    out.learning_rate = g.learning_rate;
    out.rho = g.rho;
    out.one_minus_rho = g.one_minus_rho;
    out.epsilon = g.epsilon;
    out.epsilon_outside = g.epsilon_outside;
    out.momentum = g.momentum;
    out.weight_decay = g.weight_decay;
    out.increment_scale = g.increment_scale;
    out.update_scale = g.update_scale;
    out.bias_correction = g.bias_correction;
    out.inverse_bias_correction = g.inverse_bias_correction;
    return out;
}

fn unscale_gradient(raw: Lanes) -> Lanes {
    return raw / s.loss_scale;
}

fn accumulate_gradient(gradient: Lanes, accumulator: Lanes) -> Lanes {
    return gradient + accumulator;
}

fn average_accumulated(gradient: Lanes, accumulator: Lanes) -> Lanes {
    return (gradient + accumulator) / s.accumulation_steps;
}

fn effective_gradient(raw: Lanes, accumulator: Lanes) -> Lanes {
    let g = unscale_gradient(raw);
    if ACCUMULATE {
        return average_accumulated(g, accumulator);
    }
    return g;
}

fn clip_gradient(gradient: Lanes, clip: ClipFactors) -> Lanes {
    let g = (gradient * clip.numerator) / clip.denominator;
    if CLIP_KIND == 3u {
        return select(clamp(g, Lanes(-s.clip_value), Lanes(s.clip_value)), g, lanes_nan(g));
    }
    return g;
}

fn orient_gradient(gradient: Lanes) -> Lanes {
    return gradient * s.gradient_sign;
}

fn decay_weight(param: Lanes) -> Lanes {
    return param - param * s.weight_decay * s.learning_rate;
}

fn decay_gradient(gradient: Lanes, param: Lanes) -> Lanes {
    return gradient + s.weight_decay * param;
}

fn rmsprop_velocity(velocity: Lanes, gradient: Lanes) -> Lanes {
    return s.rho * velocity + s.one_minus_rho * (gradient * gradient);
}

fn rmsprop_average_gradient(average: Lanes, gradient: Lanes) -> Lanes {
    return s.rho * average + s.one_minus_rho * gradient;
}

fn rmsprop_denominator(velocity: Lanes, average: Lanes) -> Lanes {
    if CENTERED {
        let v = velocity / s.bias_correction;
        let a = average / s.bias_correction;
        return v - a * a + s.epsilon;
    }
    return velocity * s.inverse_bias_correction + s.epsilon;
}

fn rmsprop_increment(gradient: Lanes, denominator: Lanes) -> Lanes {
    return (s.increment_scale * gradient) / (sqrt(denominator) + s.epsilon_outside);
}

fn rmsprop_momentum(momentum: Lanes, increment: Lanes) -> Lanes {
    return s.momentum * momentum + increment;
}

fn rmsprop_update(momentum: Lanes, increment: Lanes) -> Lanes {
    var moved = increment;
    if NESTEROV {
        moved = increment + s.momentum * momentum;
    } else if USE_MOMENTUM {
        moved = momentum;
    }
    return moved * s.update_scale;
}

fn ema_update(ema: Lanes, param: Lanes) -> Lanes {
    return s.ema_momentum * ema + (1.0 - s.ema_momentum) * param;
}

fn ema_overwrite(param: Lanes, ema: Lanes) -> Lanes {
    return ema * s.ema_overwrite + param * (1.0 - s.ema_overwrite);
}

// math::hash32 (lowbias32), four at a time.
fn hash32(v: vec4<u32>) -> vec4<u32> {
    var x = v;
    x ^= x >> vec4(16u);
    x *= vec4(0x7feb352du);
    x ^= x >> vec4(15u);
    x *= vec4(0x846ca68bu);
    x ^= x >> vec4(16u);
    return x;
}

// math::element_key of four consecutive elements of `tensor` from `element`.
fn element_key(tensor: u32, element: u32) -> vec4<u32> {
    let elements = vec4(element) + vec4(0u, 1u, 2u, 3u);
    return hash32(vec4(s.rounding_seed) ^ hash32(vec4(s.rounding_step) ^ hash32(vec4(tensor) ^ hash32(elements))));
}

// math::assignment_bits
fn assignment_bits(key: vec4<u32>, k: u32) -> vec4<u32> {
    return hash32(key ^ vec4((k + 1u) * 0x9e3779b9u));
}

// math::rounding_bits
fn rounding_bits(key: vec4<u32>, k: u32) -> vec4<u32> {
    if PARAM_ROUNDING == 1u {
        return assignment_bits(key, k);
    }
    return vec4(0u);
}

// math::stochastic_bf16
fn stochastic_bf16(x: Lanes, bits: vec4<u32>) -> Lanes {
    let b = bitcast<vec4<u32>>(x);
    let rounded = (b + (bits & vec4(0xffffu))) & vec4(0xffff0000u);
    return bitcast<Lanes>(select(rounded, b | vec4(0x400000u), lanes_nan(x)));
}

// math::stochastic_f16 (every step exact in f32, as on the CPU)
fn stochastic_f16(x: Lanes, bits: vec4<u32>) -> Lanes {
    let a = abs(x);
    let b = bitcast<vec4<u32>>(x);
    let normal = bitcast<Lanes>((b + (bits & vec4(0x1fffu))) & vec4(0xffffe000u));
    let scaled = a * 16777216.0;
    let below = floor(scaled);
    let u = vec4<f32>(bits >> vec4(8u)) * (1.0 / 16777216.0);
    let up = select(Lanes(0.0), Lanes(1.0), scaled - below > u);
    let magnitude = (below + up) * (1.0 / 16777216.0);
    let sign = b & vec4(0x80000000u);
    let subnormal = bitcast<Lanes>(bitcast<vec4<u32>>(magnitude) | sign);
    var r = select(normal, subnormal, a < Lanes(6.1035156e-5));
    let infinity = bitcast<Lanes>(vec4(F32_EXPONENT_BITS) | sign);
    r = select(r, infinity, abs(r) > Lanes(65504.0));
    return select(r, bitcast<Lanes>(b | vec4(0x400000u)), lanes_nan(x));
}

// A value assigned to a parameter rounded to nearest (ties to even) to its storage type.
fn nearest_param(x: Lanes) -> Lanes {
    if PARAM_DTYPE == 1u {
        return bf16_lanes(bf16_from_lanes(x));
    } else if PARAM_DTYPE == 2u {
        return f16_lanes(f16_from_lanes(x));
    }
    return x;
}

// math::store_param: a value assigned to a parameter, rounded to its storage type, to
// nearest or stochastically (with `bits`).
fn store_param(x: Lanes, bits: vec4<u32>) -> Lanes {
    if PARAM_ROUNDING == 1u && PARAM_DTYPE == 1u {
        return stochastic_bf16(x, bits);
    } else if PARAM_ROUNDING == 1u && PARAM_DTYPE == 2u {
        return stochastic_f16(x, bits);
    }
    return nearest_param(x);
}

fn rmsprop_element(before: ElementState, gradient: Lanes, key: vec4<u32>) -> ElementState {
    let bits = rounding_bits(key, 1u);
    var e = before;
    e.velocity = rmsprop_velocity(e.velocity, gradient);
    if CENTERED {
        e.average_gradient = rmsprop_average_gradient(e.average_gradient, gradient);
    }
    let denominator = rmsprop_denominator(e.velocity, e.average_gradient);
    let increment = rmsprop_increment(gradient, denominator);
    if USE_MOMENTUM {
        e.momentum = rmsprop_momentum(e.momentum, increment);
    }
    e.param = store_param(e.param - rmsprop_update(e.momentum, increment), bits);
    return e;
}

fn update_element(raw_gradient: Lanes, before: ElementState, t: TensorStep, key: vec4<u32>) -> ElementState {
    var e = before;
    // a frozen tensor: nothing moves (no branch of this chain, and no EMA; `update`
    // returns before it reaches a frozen chunk's elements, so this costs no compare
    // per element in variants without EMA)
    if t.phase == PHASE_ACCUMULATE {
        e.accumulator = accumulate_gradient(unscale_gradient(raw_gradient), e.accumulator);
    } else if t.phase == PHASE_UPDATE {
        let g = effective_gradient(raw_gradient, e.accumulator);
        if ACCUMULATE {
            e.accumulator = Lanes(0.0);
        }
        var clipped = orient_gradient(clip_gradient(g, t.clip));
        if t.decay && COUPLED_DECAY {
            clipped = decay_gradient(clipped, e.param);
        } else if t.decay {
            e.param = store_param(decay_weight(e.param), rounding_bits(key, 0u));
        }
        e = rmsprop_element(e, clipped, key);
    }
    if USE_EMA && !(PARAM_GROUPS && t.phase == PHASE_FROZEN) {
        e.ema = ema_update(e.ema, e.param);
        if s.ema_overwrite_enabled != 0u {
            e.param = store_param(ema_overwrite(e.param, e.ema), rounding_bits(key, 2u));
        }
    }
    return e;
}

// ---- arena access --------------------------------------------------------------

// bf16 in the low (`lo`) or high half of words, as f32: the bits shifted up; a NaN gets
// its quiet bit, as `half::bf16::to_f32` does.
fn bf16_lanes(bits: vec4<u32>) -> Lanes {
    let nan = (bits & vec4(0x7fffu)) > vec4(0x7f80u);
    return bitcast<Lanes>(select(bits, bits | vec4(0x40u), nan) << vec4(16u));
}

// IEEE binary16 as f32, exactly (`half::f16::to_f32`): normal numbers rebias the
// exponent, subnormals are their significand times 2^-24 (exact in f32), infinities
// stay, and a NaN keeps its payload with the quiet bit set. By bits, so no adapter's
// f16 handling (or lack of the `shader-f16` feature) can change a value.
fn f16_lanes(bits: vec4<u32>) -> Lanes {
    let sign = (bits & vec4(0x8000u)) << vec4(16u);
    let exponent = (bits >> vec4(10u)) & vec4(0x1fu);
    let mantissa = bits & vec4(0x3ffu);
    let normal = sign | ((exponent + vec4(112u)) << vec4(23u)) | (mantissa << vec4(13u));
    let special = sign | vec4(F32_EXPONENT_BITS) | (mantissa << vec4(13u))
        | select(vec4(0u), vec4(0x400000u), mantissa != vec4(0u));
    // 0x33800000: 2^-24
    let subnormal = sign | bitcast<vec4<u32>>(vec4<f32>(mantissa) * bitcast<f32>(0x33800000u));
    let is_subnormal = exponent == vec4(0u);
    let is_special = exponent == vec4(0x1fu);
    return bitcast<Lanes>(select(select(normal, special, is_special), subnormal, is_subnormal));
}

// f32 lanes as bf16 bits, rounded to nearest, ties to even (`half::bf16::from_f32`: a
// NaN keeps its top bits and gets the quiet bit).
fn bf16_from_lanes(x: Lanes) -> vec4<u32> {
    let bits = bitcast<vec4<u32>>(x);
    let nan = (bits & vec4(0x7fffffffu)) > vec4(F32_EXPONENT_BITS);
    let round_up = ((bits & vec4(0x8000u)) != vec4(0u)) & ((bits & vec4(0x17fffu)) != vec4(0u));
    let rounded = (bits >> vec4(16u)) + select(vec4(0u), vec4(1u), round_up);
    return select(rounded, (bits >> vec4(16u)) | vec4(0x40u), nan);
}

// f32 lanes as IEEE binary16 bits, rounded to nearest, ties to even
// (`half::f16::from_f32`): too large is infinity, too small a signed zero or a
// subnormal, a NaN keeps the top of its payload and gets the quiet bit.
fn f16_from_lanes(x: Lanes) -> vec4<u32> {
    let bits = bitcast<vec4<u32>>(x);
    let sign = (bits & vec4(0x80000000u)) >> vec4(16u);
    let exponent = bits & vec4(F32_EXPONENT_BITS);
    let mantissa = bits & vec4(0x7fffffu);
    let special = sign | vec4(0x7c00u) | (mantissa >> vec4(13u))
        | select(vec4(0u), vec4(0x200u), mantissa != vec4(0u));
    // the exponent rebiased for binary16 (f32 bias 127, binary16 bias 15)
    let half_exp = bitcast<vec4<i32>>(exponent >> vec4(23u)) - vec4(112i);
    let normal_bits = sign | (bitcast<vec4<u32>>(max(half_exp, vec4(0i))) << vec4(10u))
        | (mantissa >> vec4(13u));
    let normal_up = ((mantissa & vec4(0x1000u)) != vec4(0u)) & ((mantissa & vec4(0x2fffu)) != vec4(0u));
    let normal = normal_bits + select(vec4(0u), vec4(1u), normal_up);
    // subnormal results: the significand with its hidden bit, shifted by 14..24
    let shift = bitcast<vec4<u32>>(clamp(vec4(14i) - half_exp, vec4(14i), vec4(24i)));
    let full = mantissa | vec4(0x800000u);
    let round_bit = vec4(1u) << (shift - vec4(1u));
    let sub_up = ((full & round_bit) != vec4(0u)) & ((full & (vec4(3u) * round_bit - vec4(1u))) != vec4(0u));
    let subnormal = sign | ((full >> shift) + select(vec4(0u), vec4(1u), sub_up));
    var out = normal;
    out = select(out, subnormal, half_exp <= vec4(0i));
    out = select(out, sign, vec4(14i) - half_exp > vec4(24i));
    out = select(out, sign | vec4(0x7c00u), half_exp >= vec4(31i));
    return select(out, special, exponent == vec4(F32_EXPONENT_BITS));
}

// Words of one Lanes group stored as 16-bit halves: the half `i % 2` of a vec4.
fn pair_of(v: vec4<u32>, i: u32) -> vec2<u32> {
    return select(v.xy, v.zw, (i & 1u) == 1u);
}

// The 16-bit Lanes group `i` of the state region starting at vec4 `base`, as its two
// words.
fn state_pair(base: u32, i: u32) -> vec2<u32> {
    return pair_of(state[base + i / 2u], i);
}

fn set_state_pair(base: u32, i: u32, pair: vec2<u32>) {
    let v = base + i / 2u;
    let c = 2u * (i & 1u);
    state[v][c] = pair.x;
    state[v][c + 1u] = pair.y;
}

// Word `w` of the segment's state binding.
fn state_word(w: u32) -> u32 {
    return state[w / 4u][w % 4u];
}

fn set_state_word(w: u32, value: u32) {
    state[w / 4u][w % 4u] = value;
}

// Parameters of vec4 i into the 16-bit copy (PARAM_COPY), two per u32.
fn store_param_copy(i: u32, row: Chunk, param: Lanes) {
    set_state_pair(row.copy_at, i, copy_words(param));
}

// Four parameters as their 16-bit copy (PARAM_COPY), two per u32.
fn copy_words(param: Lanes) -> vec2<u32> {
    if PARAM_COPY == 1u {
        return pack_halves(bf16_from_lanes(param));
    }
    return pack_halves(f16_from_lanes(param));
}

// Raw gradient of vec4 i, as f32 lanes, in the variant's GRADIENT_DTYPE.
fn load_gradient(i: u32) -> Lanes {
    if GRADIENT_DTYPE == 0u {
        return bitcast<Lanes>(grads[i]);
    }
    let halves = unpack_halves(pair_of(grads[i / 2u], i));
    if GRADIENT_DTYPE == 1u {
        return bf16_lanes(halves);
    }
    return f16_lanes(halves);
}

// Parameters of vec4 i, as f32 lanes, and their store (already rounded: store_param).
fn unpack_halves(pair: vec2<u32>) -> vec4<u32> {
    return vec4(pair.x & 0xffffu, pair.x >> 16u, pair.y & 0xffffu, pair.y >> 16u);
}

fn pack_halves(halves: vec4<u32>) -> vec2<u32> {
    return vec2(halves.x | (halves.y << 16u), halves.z | (halves.w << 16u));
}

fn load_param(i: u32, row: Chunk) -> Lanes {
    if PARAM_DTYPE == 0u {
        return bitcast<Lanes>(params[i]);
    }
    let halves = unpack_halves(pair_of(params[i / 2u], i));
    if PARAM_DTYPE == 3u {
        let remainders = unpack_halves(state_pair(row.remainders_at, i));
        return bitcast<Lanes>((halves << vec4(16u)) + remainders - vec4(0x7fffu));
    }
    if PARAM_DTYPE == 1u {
        return bf16_lanes(halves);
    }
    return f16_lanes(halves);
}

// Four parameters stored in 16 bits (PARAM_DTYPE 1 to 3): their halves, and with
// remainders (3) the remainders, each two per u32.
struct ParamWords {
    halves: vec2<u32>,
    remainders: vec2<u32>,
}

fn param_words(p: Lanes) -> ParamWords {
    if PARAM_DTYPE == 3u {
        // the master split exactly: its top 16 bits rounded to nearest (exact ties
        // toward zero) and the signed rest, offset by 0x7fff; a NaN keeps a quiet NaN
        let b = bitcast<vec4<u32>>(p);
        let nan = lanes_nan(p);
        let halves = select((b + vec4(0x7fffu)) >> vec4(16u), (b >> vec4(16u)) | vec4(0x40u), nan);
        let remainders = select((b - (halves << vec4(16u)) + vec4(0x7fffu)) & vec4(0xffffu), vec4(0x7fffu), nan);
        return ParamWords(pack_halves(halves), pack_halves(remainders));
    } else if PARAM_DTYPE == 1u {
        return ParamWords(pack_halves(bf16_from_lanes(p)), vec2(0u));
    }
    return ParamWords(pack_halves(f16_from_lanes(p)), vec2(0u));
}

fn write_param(i: u32, row: Chunk, p: Lanes) {
    if PARAM_DTYPE == 0u {
        params[i] = bitcast<vec4<u32>>(p);
        return;
    }
    let w = param_words(p);
    if PARAM_DTYPE == 3u {
        set_state_pair(row.remainders_at, i, w.remainders);
    }
    let v = i / 2u;
    let c = 2u * (i & 1u);
    params[v][c] = w.halves.x;
    params[v][c + 1u] = w.halves.y;
}

// write_param and store_param_copy of Lanes groups i (even) and i + 1 at once: each
// 16-bit array gets one whole vec4, where one group alone writes half of one (two
// 4-byte stores, which software adapters pay for).
fn write_param_pair(i: u32, row: Chunk, p0: Lanes, p1: Lanes) {
    if PARAM_DTYPE == 0u {
        params[i] = bitcast<vec4<u32>>(p0);
        params[i + 1u] = bitcast<vec4<u32>>(p1);
    } else {
        let a = param_words(p0);
        let b = param_words(p1);
        params[i / 2u] = vec4(a.halves, b.halves);
        if PARAM_DTYPE == 3u {
            state[row.remainders_at + i / 2u] = vec4(a.remainders, b.remainders);
        }
    }
    if PARAM_COPY != 0u {
        state[row.copy_at + i / 2u] = vec4(copy_words(p0), copy_words(p1));
    }
}

// ---- control tables ------------------------------------------------------------

// Chunk `c` of the model-wide chunk table, with its segment's regions.
fn chunk_row(c: u32) -> Chunk {
    let at = segment.chunk_rows + c * CHUNK_ROW_WORDS;
    let w = &control.words;
    return Chunk(w[at], w[at + 1u], w[at + 2u], w[at + 3u], w[at + 4u], w[at + 5u],
        segment.slot_run, segment.copy_at, segment.remainders_at,
        segment.codes, segment.code_run, segment.absmax, segment.absmax_run);
}

// TensorRow::flags of tensor `t` (one load: every invocation of a chunk reads it).
fn tensor_flags(t: u32) -> u32 {
    return control.words[segment.tensor_rows + t * TENSOR_ROW_WORDS + TENSOR_FLAGS_WORD];
}

// TensorRow::group of tensor `t`.
fn tensor_group(t: u32) -> u32 {
    return control.words[segment.tensor_rows + t * TENSOR_ROW_WORDS + TENSOR_GROUP_WORD];
}

// Row `group - 1` of the group table for plan `plan`.
fn group_scalars(plan: u32, group: u32) -> GroupScalars {
    let at = segment.groups + (plan * segment.group_count + group - 1u) * GROUP_ROW_WORDS;
    let w = &control.words;
    return GroupScalars(
        bitcast<f32>(w[at]), bitcast<f32>(w[at + 1u]), bitcast<f32>(w[at + 2u]),
        bitcast<f32>(w[at + 3u]), bitcast<f32>(w[at + 4u]), bitcast<f32>(w[at + 5u]),
        bitcast<f32>(w[at + 6u]), bitcast<f32>(w[at + 7u]), bitcast<f32>(w[at + 8u]),
        bitcast<f32>(w[at + 9u]), bitcast<f32>(w[at + 10u]), w[at + 11u]);
}

fn tensor_row(t: u32) -> TensorRow {
    let at = segment.tensor_rows + t * TENSOR_ROW_WORDS;
    let w = &control.words;
    return TensorRow(w[at], w[at + 1u], w[at + 2u], w[at + 3u]);
}

fn clip_factors(t: u32) -> ClipFactors {
    let at = segment.clips + 2u * t;
    return ClipFactors(bitcast<f32>(control.words[at]), bitcast<f32>(control.words[at + 1u]));
}

fn set_clip_factors(t: u32, f: ClipFactors) {
    let at = segment.clips + 2u * t;
    control.words[at] = bitcast<u32>(f.numerator);
    control.words[at + 1u] = bitcast<u32>(f.denominator);
}

fn code_map(i: u32) -> u32 {
    return control.words[segment.code_maps + i];
}

// ---- slots ---------------------------------------------------------------------

// The Slot numbers (Slot::ALL order): the map a slot's int8 codes use, the bits of its
// stochastic rounding.
const SLOT_VELOCITY: u32 = 0u;
const SLOT_MOMENTUM: u32 = 1u;
const SLOT_AVERAGE_GRADIENT: u32 = 2u;
const SLOT_EMA: u32 = 3u;
const SLOT_ACCUMULATOR: u32 = 4u;

const FORMAT_F32: u32 = 0u;
const FORMAT_INT8: u32 = 2u;

// quant::CodeMap::gpu_table: values at 0 (unsigned) and 256 (signed), thresholds 512
// further (f32 bits), then the guesses (two per word) at GUESSES, the signed map's
// GUESS_WORDS further; the unsigned map has 254 finite values then +inf and NaN, the
// signed one 255 then NaN, its bytes flipped by 127 (0 is byte 0 in both).
const MAP_SIGNED: u32 = 256u;
const MAP_THRESHOLDS: u32 = 512u;
const NAN_INDEX: u32 = 255u;
const GUESSES: u32 = 1024u;
const GUESS_WORDS: u32 = 27649u;
const GUESS_LOW: u32 = 0x32000u;
const GUESS_HIGH: u32 = 0x3f800u;
const GUESS_CLEAN: u32 = 0x100u;
// quant::SCALE_LIMITS
const SCALE_LOW: f32 = 0x1p-100f;
const SCALE_HIGH: f32 = 0x1p100f;

fn map_base(id: u32) -> u32 {
    return select(MAP_SIGNED, 0u, id == SLOT_VELOCITY);
}

fn map_flip(id: u32) -> u32 {
    return select(127u, 0u, id == SLOT_VELOCITY);
}

fn map_max_finite(id: u32) -> u32 {
    return select(254u, 253u, id == SLOT_VELOCITY);
}

fn map_inf_index(id: u32) -> u32 {
    return select(NAN_INDEX, 254u, id == SLOT_VELOCITY);
}

fn map_lanes(at: vec4<u32>) -> Lanes {
    return bitcast<Lanes>(vec4(code_map(at.x), code_map(at.y), code_map(at.z), code_map(at.w)));
}

// quant::block_absmax of four lanes.
fn block_absmax(x: Lanes) -> f32 {
    let a = select(abs(x), Lanes(0.0), lanes_non_finite(x));
    return max(max(a.x, a.y), max(a.z, a.w));
}

// quant::encode_int8, four lanes of slot `id` in a block scaled by `absmax`.
fn encode_int8(x: Lanes, absmax: f32, id: u32) -> vec4<u32> {
    let base = map_base(id);
    let max_finite = vec4(map_max_finite(id));
    var index = vec4(0u);
    for (var bit = 128u; bit > 0u; bit >>= 1u) {
        let candidate = index | vec4(bit);
        let at = max(min(candidate, max_finite), vec4(1u)) - vec4(1u);
        let threshold = map_lanes(vec4(MAP_THRESHOLDS + base) + at);
        index = select(index, candidate, (candidate <= max_finite) & (x >= absmax * threshold));
    }
    return stored_code(index, x, absmax, id);
}

// The stored byte of sorted index `index` for x: NaN and infinities their special
// codes, everything 0.0 (byte 0) when absmax is 0, the flip of the signed map.
fn stored_code(index: vec4<u32>, x: Lanes, absmax: f32, id: u32) -> vec4<u32> {
    let nan = lanes_nan(x);
    let infinite = lanes_non_finite(x) & !nan;
    let special = select(vec4(NAN_INDEX), vec4(map_inf_index(id)), infinite & (x > Lanes(0.0)));
    let sorted = select(index, special, nan | infinite);
    let zero = !(nan | infinite) & vec4(absmax == 0.0);
    return select(sorted ^ vec4(map_flip(id)), vec4(0u), zero);
}

// quant::encode_int8_fast: the sorted index of |x| / absmax guessed from its top 20
// bits (a threshold at most one guess away). Where every lane's bucket is clean (no
// threshold near it: quant::GUESS_CLEAN) and the scale is within quant::SCALE_LIMITS,
// the guess is the index; otherwise it is settled by two threshold comparisons and
// checked against the two around the result, and a lane that fails the check (none
// has been seen) takes encode_int8's search. The same byte as encode_int8.
fn encode_int8_fast(x: Lanes, absmax: f32, id: u32) -> vec4<u32> {
    let base = map_base(id);
    let max_finite = vec4(map_max_finite(id));
    let thresholds = vec4(MAP_THRESHOLDS + base);
    let y = bitcast<vec4<u32>>(abs(x) * (1.0 / absmax)) >> vec4(12u);
    let key = clamp(y, vec4(GUESS_LOW), vec4(GUESS_HIGH)) - vec4(GUESS_LOW);
    let words = vec4(GUESSES + select(GUESS_WORDS, 0u, id == SLOT_VELOCITY)) + key / vec4(2u);
    let packed = vec4(code_map(words.x), code_map(words.y), code_map(words.z), code_map(words.w));
    let entry = packed >> ((key % vec4(2u)) * vec4(16u));
    let guess = entry & vec4(0xffu);
    var around = guess;
    if id != SLOT_VELOCITY {
        around = select(guess, max_finite - guess, x < Lanes(0.0));
    } else {
        around = select(guess, vec4(0u), x < Lanes(0.0));
    }
    // (non-finite lanes take their special codes whatever the guess)
    let clean = ((entry & vec4(GUESS_CLEAN)) != vec4(0u)) | lanes_non_finite(x);
    if all(clean) && absmax >= SCALE_LOW && absmax <= SCALE_HIGH {
        return stored_code(around, x, absmax, id);
    }
    // thresholds lo - 1 .. lo + 2 (past the last finite value they are infinite)
    let lo = max(around, vec4(1u)) - vec4(1u);
    let t0 = map_lanes(thresholds + lo);
    let t1 = map_lanes(thresholds + min(lo + vec4(1u), vec4(255u)));
    let t2 = map_lanes(thresholds + min(lo + vec4(2u), vec4(255u)));
    let below = map_lanes(thresholds + max(lo, vec4(1u)) - vec4(1u));
    let up0 = x >= absmax * t0;
    let up1 = x >= absmax * t1;
    var index = lo + select(vec4(0u), vec4(1u), up0) + select(vec4(0u), vec4(1u), up1);
    // the check: x below the threshold above the index, at or over the one under it
    let above_ok = select(!up0, select(!up1, !(x >= absmax * t2), up1), up0);
    let under = select(select(below, t0, up0), t1, up1);
    let under_ok = (index == vec4(0u)) | (x >= absmax * under);
    let bad = !lanes_non_finite(x) & vec4(absmax != 0.0) & !(above_ok & under_ok);
    if any(bad) {
        return select(stored_code(index, x, absmax, id), encode_int8(x, absmax, id), bad);
    }
    return stored_code(index, x, absmax, id);
}

// quant::decode_int8
fn decode_int8(codes: vec4<u32>, absmax: f32, id: u32) -> Lanes {
    let v = map_lanes(vec4(map_base(id)) + (codes ^ vec4(map_flip(id))));
    return select(v * absmax, v, lanes_non_finite(v));
}

fn unpack_bytes(word: u32) -> vec4<u32> {
    return (vec4(word) >> vec4(0u, 8u, 16u, 24u)) & vec4(0xffu);
}

fn pack_bytes(b: vec4<u32>) -> u32 {
    return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}

// quant::state_key of four consecutive elements of `tensor` from `element`.
fn state_key(tensor: u32, element: u32) -> vec4<u32> {
    let elements = vec4(element) + vec4(0u, 1u, 2u, 3u);
    return hash32(vec4(s.state_seed) ^ hash32(vec4(s.rounding_step) ^ hash32(vec4(tensor) ^ hash32(elements))));
}

// Runs (vec4s of `slots`, words of `state_codes`) per kept slot.
// The first word of compact slot run `run`.
fn code_run_at(run: u32, row: Chunk) -> u32 {
    return row.codes + run * row.code_run;
}

// The word holding the scale of the int8 block of the chunk's vec4 k, in slot run `run`.
fn scale_word(run: u32, row: Chunk, k: u32) -> u32 {
    return row.absmax + run * row.absmax_run + (row.state_at + 4u * k) / BLOCK_SIZE;
}

// Slot `id` (kept as run `run`) of the chunk's vec4 k, as f32 lanes.
fn load_slot(run: u32, id: u32, row: Chunk, k: u32) -> Lanes {
    if STATE_DTYPE == 0u || row.state_format == FORMAT_F32 {
        return bitcast<Lanes>(state[run * row.slot_run + row.state_at / 4u + k]);
    }
    if STATE_DTYPE == 1u {
        return bf16_lanes(unpack_halves(state_pair(code_run_at(run, row) / 4u, row.state_at / 4u + k)));
    }
    let codes = state_word(code_run_at(run, row) + row.state_at / 4u + k);
    return decode_int8(unpack_bytes(codes), bitcast<f32>(state_word(scale_word(run, row, k))), id);
}

// Stores slot `id` of the chunk's vec4 k as f32 or bf16 (rounded to nearest, or
// stochastically from the state key `key`); int8 goes through store_slot_int8.
fn store_slot(run: u32, id: u32, row: Chunk, k: u32, x: Lanes, key: vec4<u32>) {
    if STATE_DTYPE == 0u || row.state_format == FORMAT_F32 {
        state[run * row.slot_run + row.state_at / 4u + k] = bitcast<vec4<u32>>(x);
        return;
    }
    var bits = bf16_from_lanes(x);
    if STATE_ROUNDING == 1u {
        bits = bitcast<vec4<u32>>(stochastic_bf16(x, assignment_bits(key, 8u + id))) >> vec4(16u);
    }
    set_state_pair(code_run_at(run, row) / 4u, row.state_at / 4u + k, pack_halves(bits));
}

// Stores slot `id` of the chunk's vec4 k as int8 codes of its block's new `absmax`;
// the block's first invocation stores the scale (with BLOCK_PER_INVOCATION,
// update_int8_blocks stores it after the block's last load).
fn store_slot_int8(run: u32, id: u32, row: Chunk, k: u32, x: Lanes, absmax: f32) {
    set_state_word(code_run_at(run, row) + row.state_at / 4u + k, pack_bytes(encode_int8_fast(x, absmax, id)));
    if !BLOCK_PER_INVOCATION && ((row.state_at + 4u * k) % BLOCK_SIZE) == 0u {
        set_state_word(scale_word(run, row, k), bitcast<u32>(absmax));
    }
}

// Which lanes of the chunk's vec4 `k` hold elements of its tensor (the rest is padding).
fn lanes_in_chunk(k: u32, len: u32) -> vec4<bool> {
    return vec4(4u * k) + vec4(0u, 1u, 2u, 3u) < vec4(len);
}

// What a tensor does this step (math::TensorStep), from its row and the plan.
fn tensor_step(tensor: u32) -> TensorStep {
    let flags = tensor_flags(tensor);
    var clip = ClipFactors(1.0, 1.0);
    if CLIP_KIND == 1u || CLIP_KIND == 2u {
        clip = clip_factors(tensor);
    }
    let decay = WEIGHT_DECAY && (flags & FLAG_DECAY) != 0u;
    // only a param group is frozen: without PARAM_GROUPS the flag is never read (and
    // the phase test below folds away; software adapters pay for it per invocation)
    let frozen = PARAM_GROUPS && (flags & FLAG_FROZEN) != 0u;
    let phase = phase_of((flags & FLAG_HAS_GRADIENT) != 0u, frozen);
    return TensorStep(phase, decay, clip);
}

// vec4 i (the chunk's vec4 k) as `phase` reads it (what it does not read stays 0).
fn load_element(i: u32, phase: u32, row: Chunk, k: u32) -> ElementState {
    let zero = Lanes(0.0);
    var e = ElementState(load_param(i, row), zero, zero, zero, zero, zero);
    if phase == PHASE_UPDATE {
        e.velocity = load_slot(0u, SLOT_VELOCITY, row, k);
        if USE_MOMENTUM {
            e.momentum = load_slot(MOMENTUM_SLOT, SLOT_MOMENTUM, row, k);
        }
        if CENTERED {
            e.average_gradient = load_slot(AVERAGE_GRADIENT_SLOT, SLOT_AVERAGE_GRADIENT, row, k);
        }
    }
    if ACCUMULATE && phase != PHASE_NO_GRADIENT {
        e.accumulator = load_slot(ACCUMULATOR_SLOT, SLOT_ACCUMULATOR, row, k);
    }
    if USE_EMA {
        e.ema = load_slot(EMA_SLOT, SLOT_EMA, row, k);
    }
    return e;
}

// `after` in the lanes of `keep`, `before` (what was loaded) in the padding lanes.
fn keep_lanes(before: ElementState, after: ElementState, keep: vec4<bool>) -> ElementState {
    return ElementState(
        select(before.param, after.param, keep),
        select(before.velocity, after.velocity, keep),
        select(before.momentum, after.momentum, keep),
        select(before.average_gradient, after.average_gradient, keep),
        select(before.ema, after.ema, keep),
        select(before.accumulator, after.accumulator, keep),
    );
}

// The parameters of vec4 i, and the copy, after `phase` (when it assigns them).
fn store_params(i: u32, phase: u32, row: Chunk, param: Lanes) {
    if phase == PHASE_UPDATE || USE_EMA {
        write_param(i, row, param);
        if PARAM_COPY != 0u {
            store_param_copy(i, row, param);
        }
    }
}

// Stores what `phase` wrote (exactly the fields load_element read), slots in f32 or
// bf16 (`key`: the state key of stochastic rounding).
fn store_element(i: u32, phase: u32, e: ElementState, row: Chunk, k: u32, key: vec4<u32>) {
    store_slots(phase, e, row, k, key);
    store_params(i, phase, row, e.param);
}

// The slots store_element stores.
fn store_slots(phase: u32, e: ElementState, row: Chunk, k: u32, key: vec4<u32>) {
    if phase == PHASE_UPDATE {
        store_slot(0u, SLOT_VELOCITY, row, k, e.velocity, key);
        if USE_MOMENTUM {
            store_slot(MOMENTUM_SLOT, SLOT_MOMENTUM, row, k, e.momentum, key);
        }
        if CENTERED {
            store_slot(AVERAGE_GRADIENT_SLOT, SLOT_AVERAGE_GRADIENT, row, k, e.average_gradient, key);
        }
    }
    if ACCUMULATE && phase != PHASE_NO_GRADIENT {
        store_slot(ACCUMULATOR_SLOT, SLOT_ACCUMULATOR, row, k, e.accumulator, key);
    }
    if USE_EMA {
        store_slot(EMA_SLOT, SLOT_EMA, row, k, e.ema, key);
    }
}

// The new scales of the int8 blocks of one pass over 4 * WORKGROUP_SIZE elements:
// velocity, momentum, average gradient, EMA; and the accumulator.
struct BlockScales {
    slots: vec4<f32>,
    accumulator: f32,
}

// The largest finite magnitudes of each slot of `e`, and of `scales` before.
fn max_scales(scales: BlockScales, e: ElementState) -> BlockScales {
    let m = vec4(block_absmax(e.velocity), block_absmax(e.momentum), block_absmax(e.average_gradient), block_absmax(e.ema));
    return BlockScales(max(scales.slots, m), max(scales.accumulator, block_absmax(e.accumulator)));
}

// Each invocation's largest finite magnitudes (none when `live` is false), maxed over
// its block's BLOCK_SIZE / 4 invocations by a tree in workgroup memory. Call from
// uniform control flow only.
fn block_scales_of(lid: u32, e: ElementState, live: bool) -> BlockScales {
    var own = BlockScales(vec4(0.0), 0.0);
    if live {
        own = max_scales(own, e);
    }
    workgroupBarrier();
    block_scales[lid] = own.slots;
    scratch[lid] = own.accumulator;
    workgroupBarrier();
    // two levels of eight: blocks of at most 64 invocations, three barriers (what a
    // reduction costs on software adapters)
    let width = BLOCK_SIZE / 4u;
    if lid % 8u == 0u {
        for (var j = 1u; j < min(width, 8u); j++) {
            block_scales[lid] = max(block_scales[lid], block_scales[lid + j]);
            scratch[lid] = max(scratch[lid], scratch[lid + j]);
        }
    }
    workgroupBarrier();
    if lid % width == 0u {
        for (var j = 8u; j < width; j += 8u) {
            block_scales[lid] = max(block_scales[lid], block_scales[lid + j]);
            scratch[lid] = max(scratch[lid], scratch[lid + j]);
        }
    }
    workgroupBarrier();
    let leader = lid - lid % width;
    return BlockScales(block_scales[leader], scratch[leader]);
}

// store_element for int8 slots, with their blocks' new scales.
fn store_element_int8(i: u32, phase: u32, e: ElementState, row: Chunk, k: u32, scales: BlockScales) {
    if phase == PHASE_UPDATE {
        store_slot_int8(0u, SLOT_VELOCITY, row, k, e.velocity, scales.slots.x);
        if USE_MOMENTUM {
            store_slot_int8(MOMENTUM_SLOT, SLOT_MOMENTUM, row, k, e.momentum, scales.slots.y);
        }
        if CENTERED {
            store_slot_int8(AVERAGE_GRADIENT_SLOT, SLOT_AVERAGE_GRADIENT, row, k, e.average_gradient, scales.slots.z);
        }
    }
    if ACCUMULATE && phase != PHASE_NO_GRADIENT {
        store_slot_int8(ACCUMULATOR_SLOT, SLOT_ACCUMULATOR, row, k, e.accumulator, scales.accumulator);
    }
    if USE_EMA {
        store_slot_int8(EMA_SLOT, SLOT_EMA, row, k, e.ema, scales.slots.w);
    }
    store_params(i, phase, row, e.param);
}

// The gradient the norm passes square: math::effective_gradient of vec4 i (the
// chunk's vec4 k).
fn effective_gradient_at(i: u32, row: Chunk, k: u32) -> Lanes {
    var accumulator = Lanes(0.0);
    if ACCUMULATE {
        accumulator = load_slot(ACCUMULATOR_SLOT, SLOT_ACCUMULATOR, row, k);
    }
    return effective_gradient(load_gradient(i), accumulator);
}

fn workgroup_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Sum of `value` over the workgroup in a fixed order (deterministic): 16 invocations
// each add 16 values in order, then every invocation adds those 16 partial sums in
// order and gets the total. Three barriers rather than a tree's nine: barriers are what
// a reduction costs on software adapters. Call from uniform control flow only.
fn workgroup_sum(lid: u32, value: f32) -> f32 {
    scratch[lid] = value;
    workgroupBarrier();
    if lid < REDUCE_WIDTH {
        var partial = 0.0;
        for (var k = 0u; k < REDUCE_WIDTH; k++) {
            partial += scratch[lid * REDUCE_WIDTH + k];
        }
        scratch_partials[lid] = partial;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var k = 0u; k < REDUCE_WIDTH; k++) {
        total += scratch_partials[k];
    }
    workgroupBarrier();
    return total;
}

// ---- entry points ----------------------------------------------------------------

// (lo, hi) + 1 for a 64-bit counter held in two words.
fn increment(lo_hi: vec2<u32>) -> vec2<u32> {
    let lo = lo_hi.x + 1u;
    return vec2(lo, lo_hi.y + select(0u, 1u, lo == 0u));
}

// The guard's decision, made once per step by one invocation: apply the plan for the device's
// counter and advance it, or skip the step and count the skip. With loss scaling, the
// update divides by the scale as it is now, and the scale moves on by next_loss_scale.
fn settle_guard() {
    let st = &control.step_state;
    let non_finite = atomicExchange(&(*st).non_finite, 0u) != 0u;
    if LOSS_SCALING {
        let now = LossScaleState(bitcast<f32>((*st).loss_scale), (*st).growth_counter);
        let next = next_loss_scale(now, !non_finite, step.growth_steps);
        (*st).active_scale = (*st).loss_scale;
        (*st).loss_scale = bitcast<u32>(next.scale);
        (*st).growth_counter = next.counter;
    }
    let index = (*st).counter_lo - step.base_lo;
    if index >= step.len {
        (*st).fault = 1u;
        (*st).skip = 1u;
    } else if non_finite {
        (*st).skip = 1u;
        let skipped = increment(vec2((*st).skipped_lo, (*st).skipped_hi));
        (*st).skipped_lo = skipped.x;
        (*st).skipped_hi = skipped.y;
    } else {
        (*st).skip = 0u;
        (*st).active_plan = index;
        let counter = increment(vec2((*st).counter_lo, (*st).counter_hi));
        (*st).counter_lo = counter.x;
        (*st).counter_hi = counter.y;
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    _ = CODES_HANDLED; // refuses unhandled codes (see its declaration)
    // only step-invariant fields are read here (loss scale, accumulation steps)
    s = step.plans[0];
    // non-finite is judged on the gradient divided by loss_scale_factor (1 with loss
    // scaling: Keras checks what arrives); the norm on it divided by the dynamic scale
    let check_scale = s.loss_scale;
    if LOSS_SCALING {
        s.loss_scale = bitcast<f32>(control.step_state.loss_scale);
    }
    let c = workgroup_linear(wid, nwg);
    let valid = c < segment.chunk_count;
    let global = segment.first_chunk + min(c, segment.chunk_count - 1u);
    let chunk = chunk_row(global);
    var sum = 0.0;
    var non_finite = false;
    if valid && (tensor_flags(chunk.tensor) & FLAG_HAS_GRADIENT) != 0u {
        let first = chunk.start / 4u;
        for (var k = lid; 4u * k < chunk.len; k += WORKGROUP_SIZE) {
            let i = first + k;
            let lanes = lanes_in_chunk(k, chunk.len);
            if GUARD || LOSS_SCALING {
                non_finite = non_finite || any(lanes_non_finite(load_gradient(i) / check_scale) & lanes);
            }
            if CLIP_KIND == 1u || CLIP_KIND == 2u {
                let g = select(Lanes(0.0), effective_gradient_at(i, chunk, k), lanes);
                let sq = g * g;
                sum += (sq.x + sq.y) + (sq.z + sq.w);
            }
        }
    }
    // rare (a bad step), so one atomic per invocation that saw one is cheap enough
    if non_finite {
        atomicOr(&control.step_state.non_finite, 1u);
    }
    // without norm clipping (the guard alone) there is nothing to sum
    if CLIP_KIND == 1u || CLIP_KIND == 2u {
        let total = workgroup_sum(lid, sum);
        if valid && lid == 0u {
            control.words[segment.partials + global] = bitcast<u32>(total);
        }
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_finalize(@builtin(local_invocation_index) lid: u32) {
    _ = CODES_HANDLED; // refuses unhandled codes (see its declaration)
    // only step-invariant fields are read here (clip thresholds)
    s = step.plans[0];
    if CLIP_KIND == 1u || CLIP_KIND == 2u {
        var present_sum = 0.0;
        for (var t = lid; t < step.tensor_count; t += WORKGROUP_SIZE) {
            let row = tensor_row(t);
            var sum = 0.0;
            for (var k = 0u; k < row.chunk_count; k++) {
                sum += bitcast<f32>(control.words[segment.partials + row.first_chunk + k]);
            }
            if CLIP_KIND == 1u {
                set_clip_factors(t, clipnorm_factors(sum, s.clip_norm));
            }
            if (row.flags & FLAG_HAS_GRADIENT) != 0u {
                present_sum += sum;
            }
        }
        if CLIP_KIND == 2u {
            let total = workgroup_sum(lid, present_sum);
            let factors = global_clipnorm_factors(total, s.clip_norm, s.inv_clip_norm);
            for (var t = lid; t < step.tensor_count; t += WORKGROUP_SIZE) {
                set_clip_factors(t, factors);
            }
        }
    }
    if (GUARD || LOSS_SCALING) && lid == 0u {
        settle_guard();
    }
}

// update's plan: the device's choice under the guard or loss scaling (with the scale
// this step divides by), else the first.
fn load_plan() {
    if GUARD || LOSS_SCALING {
        s = step.plans[control.step_state.active_plan];
    } else {
        s = step.plans[0];
    }
    if LOSS_SCALING {
        s.loss_scale = bitcast<f32>(control.step_state.active_scale);
    }
}

// With PARAM_GROUPS, for a tensor of group g > 0: the plan with the group's numbers for
// the same plan of the window.
fn load_group(tensor: u32) {
    let group = tensor_group(tensor);
    if group != 0u {
        var plan = 0u;
        if GUARD || LOSS_SCALING {
            plan = control.step_state.active_plan;
        }
        s = with_group(s, group_scalars(plan, group));
    }
}

// What `update` branches on, packed: the phase (bits 0-1), the device's skip (bit 2),
// whether the chunk's slots are int8 (bit 3), the chunk's length (bits 4-31).
fn branch_word(t: TensorStep, chunk: Chunk) -> u32 {
    var skip = 0u;
    if GUARD || LOSS_SCALING {
        skip = control.step_state.skip;
    }
    let int8 = select(0u, 1u, chunk.state_format == FORMAT_INT8);
    return t.phase | (skip << 2u) | (int8 << 3u) | (chunk.len << 4u);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn update(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    _ = CODES_HANDLED; // refuses unhandled codes (see its declaration)
    let c = workgroup_linear(wid, nwg);
    if c >= segment.chunk_count {
        return;
    }
    load_plan();
    let chunk = chunk_row(segment.first_chunk + c);
    if PARAM_GROUPS {
        load_group(chunk.tensor);
    }
    let t = tensor_step(chunk.tensor);
    let first = chunk.start / 4u;
    if STATE_DTYPE == 2u && BLOCK_PER_INVOCATION {
        // int8 slots, each block in one invocation: no barrier, so each invocation
        // reads what it branches on
        let word = branch_word(t, chunk);
        if (word & 8u) != 0u {
            if steps_chunk(word) {
                update_int8_blocks(chunk, t, word & 3u, word >> 4u, lid);
            }
            return;
        }
    } else if STATE_DTYPE == 2u {
        // int8 slots, each block's scales reduced by its invocations (an else branch:
        // in Tint's uniformity analysis the returns above, which are not uniform, must
        // not precede these barriers): the passes below hold barriers, so what the
        // workgroup branches on (the phase, the device's skip, whether the chunk's
        // slots are int8, its length) must be uniform, and values read from a
        // read_write buffer are not: one invocation packs them into one word, shared
        // through workgroupUniformLoad (one word, because a struct through it costs
        // software adapters dearly). Only this path has barriers; software adapters
        // (lavapipe, SwiftShader in Chrome), which run a shader with barriers far
        // slower per workgroup, take BLOCK_PER_INVOCATION instead.
        if lid == 0u {
            uniform_word = branch_word(t, chunk);
        }
        let word = workgroupUniformLoad(&uniform_word);
        if (word & 8u) != 0u {
            if !steps_chunk(word) {
                return;
            }
            let phase = word & 3u;
            let len = word >> 4u;
            // every invocation runs every pass (the blocks' scales reduce across
            // invocations), those past the chunk's end with nothing to store
            for (var base = 0u; base < len; base += 4u * WORKGROUP_SIZE) {
                let k = base / 4u + lid;
                let live = 4u * k < len;
                var after = ElementState(Lanes(0.0), Lanes(0.0), Lanes(0.0), Lanes(0.0), Lanes(0.0), Lanes(0.0));
                if live {
                    after = step_lanes(chunk, t, phase, k);
                }
                let scales = block_scales_of(lid, after, live);
                if live {
                    store_element_int8(first + k, phase, after, chunk, k, scales);
                }
            }
            return;
        }
    }
    // every other chunk: no barrier, so each invocation reads what it branches on
    let word = branch_word(t, chunk);
    if !steps_chunk(word) {
        return;
    }
    let phase = word & 3u;
    let len = word >> 4u;
    if PARAM_DTYPE != 0u || PARAM_COPY != 0u {
        // 16-bit parameter arrays: two Lanes groups per invocation, so that their
        // stores are whole vec4s (first is even: chunks start at multiples of 8)
        let assigns = phase == PHASE_UPDATE || USE_EMA;
        for (var k = 2u * lid; 4u * k < len; k += 2u * WORKGROUP_SIZE) {
            let a = step_lanes(chunk, t, phase, k);
            store_slots(phase, a, chunk, k, slot_key(chunk, k));
            if 4u * (k + 1u) < len {
                let b = step_lanes(chunk, t, phase, k + 1u);
                store_slots(phase, b, chunk, k + 1u, slot_key(chunk, k + 1u));
                if assigns {
                    write_param_pair(first + k, chunk, a.param, b.param);
                }
            } else {
                store_params(first + k, phase, chunk, a.param);
            }
        }
        return;
    }
    for (var k = lid; 4u * k < len; k += WORKGROUP_SIZE) {
        store_element(first + k, phase, step_lanes(chunk, t, phase, k), chunk, k, slot_key(chunk, k));
    }
}

// Whether a chunk of branch word `word` steps: not when the device skips the step, nor
// for a frozen tensor, nor without a gradient unless an EMA moves.
fn steps_chunk(word: u32) -> bool {
    if (GUARD || LOSS_SCALING) && (word & 4u) != 0u {
        return false;
    }
    let phase = word & 3u;
    return !((PARAM_GROUPS && phase == PHASE_FROZEN) || (phase == PHASE_NO_GRADIENT && !USE_EMA));
}

// An int8 chunk of `len` elements with each block in one invocation
// (BLOCK_PER_INVOCATION): a first pass steps the block for its new scales, a second
// steps it again (its inputs now in cache) and stores it. Stepping is deterministic,
// so both passes see the same values.
fn update_int8_blocks(chunk: Chunk, t: TensorStep, phase: u32, len: u32, lid: u32) {
    let first = chunk.start / 4u;
    let width = BLOCK_SIZE / 4u;
    let groups = (len + 3u) / 4u;
    for (var b = lid * width; b < groups; b += WORKGROUP_SIZE * width) {
        let end = min(b + width, groups);
        var scales = BlockScales(vec4(0.0), 0.0);
        for (var k = b; k < end; k++) {
            scales = max_scales(scales, step_lanes(chunk, t, phase, k));
        }
        for (var k = b; k < end; k++) {
            store_element_int8(first + k, phase, step_lanes(chunk, t, phase, k), chunk, k, scales);
        }
        // the scales last: the block's loads above decode with the old ones
        store_scales(phase, chunk, b, scales);
    }
}

// The scales of the int8 block at the chunk's vec4 k, for the slots `phase` stores.
fn store_scales(phase: u32, row: Chunk, k: u32, scales: BlockScales) {
    if phase == PHASE_UPDATE {
        set_state_word(scale_word(0u, row, k), bitcast<u32>(scales.slots.x));
        if USE_MOMENTUM {
            set_state_word(scale_word(MOMENTUM_SLOT, row, k), bitcast<u32>(scales.slots.y));
        }
        if CENTERED {
            set_state_word(scale_word(AVERAGE_GRADIENT_SLOT, row, k), bitcast<u32>(scales.slots.z));
        }
    }
    if ACCUMULATE && phase != PHASE_NO_GRADIENT {
        set_state_word(scale_word(ACCUMULATOR_SLOT, row, k), bitcast<u32>(scales.accumulator));
    }
    if USE_EMA {
        set_state_word(scale_word(EMA_SLOT, row, k), bitcast<u32>(scales.slots.w));
    }
}

// The state key of stochastic bf16 slot rounding for the chunk's vec4 k (zero without).
fn slot_key(chunk: Chunk, k: u32) -> vec4<u32> {
    if STATE_ROUNDING == 1u {
        return state_key(chunk.tensor, chunk.tensor_start + 4u * k);
    }
    return vec4(0u);
}

// The chunk's vec4 k after this step: loaded, through update_element, the padding
// lanes as loaded.
fn step_lanes(chunk: Chunk, t: TensorStep, phase: u32, k: u32) -> ElementState {
    let i = chunk.start / 4u + k;
    var raw = Lanes(0.0);
    if phase != PHASE_NO_GRADIENT {
        raw = load_gradient(i);
    }
    let before = load_element(i, phase, chunk, k);
    var key = vec4(0u);
    if PARAM_ROUNDING == 1u {
        key = element_key(chunk.tensor, chunk.tensor_start + 4u * k);
    }
    return keep_lanes(before, update_element(raw, before, t, key), lanes_in_chunk(k, chunk.len));
}

// The 16-bit copy of every parameter, rewritten from the parameters (after the host
// writes parameters, or finalize_variable_values copies the EMA over them): one
// workgroup per chunk.
@compute @workgroup_size(WORKGROUP_SIZE)
fn refresh_param_copy(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    _ = CODES_HANDLED; // refuses unhandled codes (see its declaration)
    let c = workgroup_linear(wid, nwg);
    if PARAM_COPY == 0u || c >= segment.chunk_count {
        return;
    }
    let chunk = chunk_row(segment.first_chunk + c);
    let first = chunk.start / 4u;
    for (var k = lid; 4u * k < chunk.len; k += WORKGROUP_SIZE) {
        store_param_copy(first + k, chunk, load_param(first + k, chunk));
    }
}

// finalize_variable_values with 16-bit parameters or compact slots: each parameter
// assigned its EMA (decoded), rounded to nearest (also under stochastic rounding: the
// one-off export of the EMA); one workgroup per chunk. (f32 parameters with f32 slots
// take a buffer copy.)
@compute @workgroup_size(WORKGROUP_SIZE)
fn finalize_params(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    _ = CODES_HANDLED; // refuses unhandled codes (see its declaration)
    let c = workgroup_linear(wid, nwg);
    if !USE_EMA || c >= segment.chunk_count {
        return;
    }
    let chunk = chunk_row(segment.first_chunk + c);
    let first = chunk.start / 4u;
    for (var k = lid; 4u * k < chunk.len; k += WORKGROUP_SIZE) {
        let i = first + k;
        let ema = load_slot(EMA_SLOT, SLOT_EMA, chunk, k);
        // padding lanes: the EMA's padding is zero, as the parameters' is
        write_param(i, chunk, nearest_param(ema));
    }
}
