//! Validates every WGSL shader in `shaders/` with naga, for every specialization of
//! its `override` constants, so a broken shader fails the build with its file and line.

use std::path::Path;

use naga::back::pipeline_constants::process_overrides;
use naga::back::PipelineConstants;
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// Boolean overrides and the values of `CLIP_KIND` that the host specializes.
const BOOL_OVERRIDES: [&str; 7] = [
    "CENTERED",
    "USE_MOMENTUM",
    "USE_EMA",
    "ACCUMULATE",
    "WEIGHT_DECAY",
    "GUARD",
    "LOSS_SCALING",
];
const CLIP_KINDS: [f64; 4] = [0.0, 1.0, 2.0, 3.0];
/// Overrides naming a dtype (`dtype::Dtype::code`: f32 or none, bf16, f16; 3 for bf16
/// with remainders) or a rounding, with their values.
const DTYPE_OVERRIDES: [(&str, &[f64]); 4] = [
    ("GRADIENT_DTYPE", &[0.0, 1.0, 2.0]),
    ("PARAM_COPY", &[0.0, 1.0, 2.0]),
    ("PARAM_DTYPE", &[0.0, 1.0, 2.0, 3.0]),
    ("PARAM_ROUNDING", &[0.0, 1.0]),
];

/// Compact-state specializations (`STATE_DTYPE` bf16 or int8, bf16's stochastic
/// rounding, the smallest and largest int8 blocks), each validated with every boolean
/// override off and on and every clip kind (with f32 inputs).
const STATE_RUNS: [&[(&str, f64)]; 5] = [
    &[("STATE_DTYPE", 1.0)],
    &[("STATE_DTYPE", 1.0), ("STATE_ROUNDING", 1.0)],
    &[("STATE_DTYPE", 2.0)],
    &[("STATE_DTYPE", 2.0), ("BLOCK_SIZE", 32.0)],
    &[
        ("STATE_DTYPE", 2.0),
        ("PARAM_DTYPE", 1.0),
        ("PARAM_ROUNDING", 1.0),
    ],
];

fn fail(msg: String) -> ! {
    eprintln!("{msg}");
    println!("cargo:warning=shader validation failed: see the error above");
    std::process::exit(1);
}

fn validate(path: &Path) {
    let name = path.display().to_string();
    let source =
        std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("cannot read {name}: {e}")));
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| fail(e.emit_to_string_with_path(&source, &name)));
    let mut validator = Validator::new(ValidationFlags::all(), Capabilities::all());
    let info = validator
        .validate(&module)
        .unwrap_or_else(|e| fail(e.emit_to_string_with_path(&source, &name)));
    let declared: Vec<String> = module
        .overrides
        .iter()
        .filter_map(|(_, o)| o.name.clone())
        .collect();
    let entry_points: Vec<String> = module.entry_points.iter().map(|e| e.name.clone()).collect();
    // Every combination of the boolean overrides and clip kinds this shader declares.
    let bools: Vec<&str> = BOOL_OVERRIDES
        .iter()
        .copied()
        .filter(|b| declared.iter().any(|d| d == b))
        .collect();
    let clip_kinds: &[f64] = if declared.iter().any(|d| d == "CLIP_KIND") {
        &CLIP_KINDS
    } else {
        &[0.0]
    };
    // the dtype overrides touch only loads and stores: every pair of them with no other
    // option and with all of them, the other options with f32 throughout
    let dtype_overrides: Vec<(&str, &[f64])> = DTYPE_OVERRIDES
        .iter()
        .copied()
        .filter(|(o, _)| declared.iter().any(|d| d == o))
        .collect();
    let dtype_names: Vec<&str> = dtype_overrides.iter().map(|(n, _)| *n).collect();
    let all = (1u32 << bools.len()) - 1;
    let mut runs: Vec<(u32, Vec<(&str, f64)>)> = (0..=all).map(|m| (m, Vec::new())).collect();
    let mut codes = vec![vec![]];
    for (_, values) in &dtype_overrides {
        codes = codes
            .into_iter()
            .flat_map(|c: Vec<f64>| values.iter().map(move |&d| [c.clone(), vec![d]].concat()))
            .collect();
    }
    for c in codes.into_iter().filter(|c| c.iter().any(|&d| d != 0.0)) {
        let named: Vec<(&str, f64)> = dtype_names.iter().copied().zip(c).collect();
        runs.push((0, named.clone()));
        runs.push((all, named));
    }
    for state in STATE_RUNS {
        if state.iter().all(|(o, _)| declared.iter().any(|d| d == o)) {
            runs.push((0, state.to_vec()));
            runs.push((all, state.to_vec()));
        }
    }
    for (mask, dtypes) in runs {
        for &clip in clip_kinds {
            let mut constants = PipelineConstants::default();
            for (bit, b) in bools.iter().enumerate() {
                constants.insert(b.to_string(), f64::from((mask >> bit) & 1));
            }
            if clip_kinds.len() > 1 {
                constants.insert("CLIP_KIND".into(), clip);
            }
            for &(name, code) in &dtypes {
                constants.insert(name.to_string(), code);
            }
            for ep in &entry_points {
                if let Err(e) = process_overrides(
                    &module,
                    &info,
                    Some((naga::ShaderStage::Compute, ep)),
                    &constants,
                ) {
                    fail(format!(
                        "{name}: entry point `{ep}` fails to specialize with {constants:?}: {e:?}"
                    ));
                }
            }
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=build.rs");
    let dir = Path::new("shaders");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| fail(format!("cannot list shaders/: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        fail("no .wgsl files in shaders/".into());
    }
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
        validate(p);
    }
}
