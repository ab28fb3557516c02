// (Plain comments here: `build.rs` includes this file with `include!`, where inner
// doc comments cannot stand.)
//
// The contract between the host and `shaders/rmsprop.wgsl`, written once: the
// bindings of group 0 (number, WGSL name, kind) and every `override` constant with the
// values the host may give it.
//
// `build.rs` compiles this file too (`include!`): it fails the build when the shader
// declares an override that is not here or lacks one that is, and validates the
// specializations over these values with naga. `pipelines.rs` names the overrides
// only through these constants, and a unit test checks the bindings against naga's
// reflection of the shader. The shader itself refuses codes it does not handle
// (`CODES_HANDLED`, a division by zero at pipeline creation), so a new code fails
// loudly on every compiler instead of falling back to another path.

/// How a binding is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindingKind {
    /// A uniform buffer.
    Uniform,
    /// A storage buffer the shader only reads.
    ReadOnlyStorage,
    /// A storage buffer the shader reads and writes.
    Storage,
}

/// One binding of group 0: its number, its name in the WGSL, how it is bound.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding {
    pub number: u32,
    pub name: &'static str,
    pub kind: BindingKind,
}

/// The per-step numbers (`StepUniform`).
pub(crate) const STEP: Binding = Binding {
    number: 0,
    name: "step",
    kind: BindingKind::Uniform,
};
/// The segment's rows and regions (`SegmentUniform`).
pub(crate) const SEGMENT: Binding = Binding {
    number: 1,
    name: "segment",
    kind: BindingKind::Uniform,
};
/// The model's control buffer: step state and tables.
pub(crate) const CONTROL: Binding = Binding {
    number: 2,
    name: "control",
    kind: BindingKind::Storage,
};
/// The segment's parameters.
pub(crate) const PARAMS: Binding = Binding {
    number: 3,
    name: "params",
    kind: BindingKind::Storage,
};
/// The segment's gradients.
pub(crate) const GRADS: Binding = Binding {
    number: 4,
    name: "grads",
    kind: BindingKind::ReadOnlyStorage,
};
/// The segment's own arrays: slots, compact slots, scales, the copy, remainders.
pub(crate) const STATE: Binding = Binding {
    number: 5,
    name: "state",
    kind: BindingKind::Storage,
};

/// Every binding of group 0, in binding order.
pub(crate) const BINDINGS: [Binding; 6] = [STEP, SEGMENT, CONTROL, PARAMS, GRADS, STATE];

/// Storage buffers one pipeline binds (the same in every mode).
pub(crate) const STORAGE_BUFFERS: u32 = 4;
/// Uniform buffers one pipeline binds.
pub(crate) const UNIFORM_BUFFERS: u32 = 2;

/// One WGSL `override` constant and every value the host may give it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Override {
    pub name: &'static str,
    pub values: &'static [f64],
}

const BOOL: &[f64] = &[0.0, 1.0];
/// Slot runs: the velocity is run 0, the others follow in `Slot::ALL` order.
const SLOT_RUN: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0];

pub(crate) const CENTERED: Override = Override {
    name: "CENTERED",
    values: BOOL,
};
pub(crate) const USE_MOMENTUM: Override = Override {
    name: "USE_MOMENTUM",
    values: BOOL,
};
pub(crate) const NESTEROV: Override = Override {
    name: "NESTEROV",
    values: BOOL,
};
pub(crate) const COUPLED_DECAY: Override = Override {
    name: "COUPLED_DECAY",
    values: BOOL,
};
pub(crate) const USE_EMA: Override = Override {
    name: "USE_EMA",
    values: BOOL,
};
pub(crate) const ACCUMULATE: Override = Override {
    name: "ACCUMULATE",
    values: BOOL,
};
pub(crate) const WEIGHT_DECAY: Override = Override {
    name: "WEIGHT_DECAY",
    values: BOOL,
};
pub(crate) const GUARD: Override = Override {
    name: "GUARD",
    values: BOOL,
};
/// Param groups: `update` reads each tensor's group and patches its numbers.
pub(crate) const PARAM_GROUPS: Override = Override {
    name: "PARAM_GROUPS",
    values: BOOL,
};
pub(crate) const LOSS_SCALING: Override = Override {
    name: "LOSS_SCALING",
    values: BOOL,
};
/// `ClipKind::code`: none, clipnorm, global_clipnorm, clipvalue.
pub(crate) const CLIP_KIND: Override = Override {
    name: "CLIP_KIND",
    values: &[0.0, 1.0, 2.0, 3.0],
};
/// `Dtype::code` of the gradients: f32, bf16, f16.
pub(crate) const GRADIENT_DTYPE: Override = Override {
    name: "GRADIENT_DTYPE",
    values: &[0.0, 1.0, 2.0],
};
/// `Dtype::code` of the 16-bit parameter copy, 0 for none.
pub(crate) const PARAM_COPY: Override = Override {
    name: "PARAM_COPY",
    values: &[0.0, 1.0, 2.0],
};
/// `Variant::param_dtype_code`: f32, bf16, f16, bf16 with remainders.
pub(crate) const PARAM_DTYPE: Override = Override {
    name: "PARAM_DTYPE",
    values: &[0.0, 1.0, 2.0, 3.0],
};
/// 16-bit parameters: to nearest, stochastically.
pub(crate) const PARAM_ROUNDING: Override = Override {
    name: "PARAM_ROUNDING",
    values: BOOL,
};
pub(crate) const MOMENTUM_SLOT: Override = Override {
    name: "MOMENTUM_SLOT",
    values: SLOT_RUN,
};
pub(crate) const AVERAGE_GRADIENT_SLOT: Override = Override {
    name: "AVERAGE_GRADIENT_SLOT",
    values: SLOT_RUN,
};
pub(crate) const EMA_SLOT: Override = Override {
    name: "EMA_SLOT",
    values: SLOT_RUN,
};
pub(crate) const ACCUMULATOR_SLOT: Override = Override {
    name: "ACCUMULATOR_SLOT",
    values: SLOT_RUN,
};
/// Kept slots.
pub(crate) const SLOT_COUNT: Override = Override {
    name: "SLOT_COUNT",
    values: &[1.0, 2.0, 3.0, 4.0, 5.0],
};
/// `StateDtype::code`: f32, bf16, int8.
pub(crate) const STATE_DTYPE: Override = Override {
    name: "STATE_DTYPE",
    values: &[0.0, 1.0, 2.0],
};
/// bf16 slots: to nearest, stochastically.
pub(crate) const STATE_ROUNDING: Override = Override {
    name: "STATE_ROUNDING",
    values: BOOL,
};
/// Elements per scale of dynamic 8-bit state (`StateDtype::Dynamic8`'s `block_size`).
pub(crate) const BLOCK_SIZE: Override = Override {
    name: "BLOCK_SIZE",
    values: &[32.0, 64.0, 128.0, 256.0],
};
/// Who finds an int8 block's new scale: the invocations that step it, through
/// workgroup memory and barriers (0), or the one invocation that steps the whole block
/// twice, with no barrier (1: `BlockReduction::Invocation`).
pub(crate) const BLOCK_PER_INVOCATION: Override = Override {
    name: "BLOCK_PER_INVOCATION",
    values: BOOL,
};

/// Every override the host sets, in the order `pipelines.rs` gives them.
pub(crate) const OVERRIDES: [Override; 24] = [
    CENTERED,
    USE_MOMENTUM,
    NESTEROV,
    USE_EMA,
    ACCUMULATE,
    COUPLED_DECAY,
    WEIGHT_DECAY,
    GUARD,
    LOSS_SCALING,
    CLIP_KIND,
    GRADIENT_DTYPE,
    PARAM_COPY,
    PARAM_DTYPE,
    PARAM_ROUNDING,
    MOMENTUM_SLOT,
    AVERAGE_GRADIENT_SLOT,
    EMA_SLOT,
    ACCUMULATOR_SLOT,
    SLOT_COUNT,
    STATE_DTYPE,
    STATE_ROUNDING,
    BLOCK_SIZE,
    PARAM_GROUPS,
    BLOCK_PER_INVOCATION,
];

/// Overrides the shader derives from the others (the host never sets them).
pub(crate) const DERIVED_OVERRIDES: [&str; 1] = ["CODES_HANDLED"];

/// The entry points of the shader.
pub(crate) const ENTRY_POINTS: [&str; 5] = [
    "norm_partials",
    "norm_finalize",
    "update",
    "refresh_param_copy",
    "finalize_params",
];

/// Every specialization that `build.rs` validates with naga and the Tint check
/// (`tests/tint/`) compiles with Dawn: each set of override values the host can give
/// that changes the code, as `(name, value)` pairs (absent overrides keep their
/// defaults).
///
/// - every combination of the seven boolean options, with every clip kind;
/// - every combination of the dtype overrides (gradients, copy, parameters, rounding),
///   with the options all off and all on;
/// - compact state (bf16, bf16 rounded stochastically, int8, int8 with the smallest
///   block, both with each block in one invocation, int8 with bf16 parameters rounded
///   stochastically), options off and on;
/// - the other dialects' structure (nesterov, weight decay in the gradient) and param
///   groups, options off and on;
/// - every value of every override alone (the slot runs and counts included).
pub(crate) fn specializations() -> Vec<Vec<(&'static str, f64)>> {
    let bools = [
        CENTERED,
        USE_MOMENTUM,
        USE_EMA,
        ACCUMULATE,
        WEIGHT_DECAY,
        GUARD,
        LOSS_SCALING,
    ];
    let all = (1u32 << bools.len()) - 1;
    let options = |mask: u32| -> Vec<(&'static str, f64)> {
        bools
            .iter()
            .enumerate()
            .map(|(bit, o)| (o.name, f64::from((mask >> bit) & 1)))
            .collect()
    };
    let mut out = Vec::new();
    for mask in 0..=all {
        for &clip in CLIP_KIND.values {
            let mut s = options(mask);
            s.push((CLIP_KIND.name, clip));
            out.push(s);
        }
    }
    let dtypes = [GRADIENT_DTYPE, PARAM_COPY, PARAM_DTYPE, PARAM_ROUNDING];
    let mut codes: Vec<Vec<(&'static str, f64)>> = vec![vec![]];
    for o in dtypes {
        codes = codes
            .into_iter()
            .flat_map(|c| {
                o.values.iter().map(move |&v| {
                    let mut c = c.clone();
                    c.push((o.name, v));
                    c
                })
            })
            .collect();
    }
    // the other dialects' structure: nesterov momentum, weight decay in the gradient
    let dialects: [&[(&'static str, f64)]; 4] = [
        &[(PARAM_GROUPS.name, 1.0)],
        &[(USE_MOMENTUM.name, 1.0), (NESTEROV.name, 1.0)],
        &[(WEIGHT_DECAY.name, 1.0), (COUPLED_DECAY.name, 1.0)],
        &[
            (USE_MOMENTUM.name, 1.0),
            (NESTEROV.name, 1.0),
            (WEIGHT_DECAY.name, 1.0),
            (COUPLED_DECAY.name, 1.0),
        ],
    ];
    let state: [&[(&'static str, f64)]; 7] = [
        &[(STATE_DTYPE.name, 1.0)],
        &[(STATE_DTYPE.name, 1.0), (STATE_ROUNDING.name, 1.0)],
        &[(STATE_DTYPE.name, 2.0)],
        &[(STATE_DTYPE.name, 2.0), (BLOCK_SIZE.name, 32.0)],
        &[(STATE_DTYPE.name, 2.0), (BLOCK_PER_INVOCATION.name, 1.0)],
        &[
            (STATE_DTYPE.name, 2.0),
            (BLOCK_SIZE.name, 32.0),
            (BLOCK_PER_INVOCATION.name, 1.0),
        ],
        &[
            (STATE_DTYPE.name, 2.0),
            (PARAM_DTYPE.name, 1.0),
            (PARAM_ROUNDING.name, 1.0),
        ],
    ];
    let extra = codes
        .into_iter()
        .filter(|c| c.iter().any(|&(_, v)| v != 0.0))
        .chain(state.iter().map(|s| s.to_vec()))
        .chain(dialects.iter().map(|s| s.to_vec()));
    for e in extra {
        for mask in [0, all] {
            let mut s = options(mask);
            s.retain(|(name, _)| !e.iter().any(|(given, _)| given == name));
            s.extend(e.iter().copied());
            out.push(s);
        }
    }
    for o in OVERRIDES {
        for &v in o.values {
            out.push(vec![(o.name, v)]);
        }
    }
    out
}
