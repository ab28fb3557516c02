//! Replays every Keras trace in `tests/keras/traces` and compares with
//! `tests/keras/FORMAT.md`'s tolerance, on the CPU path and on the GPU path.

mod common;

use common::trace::first_mismatch;
use fused_rmsprop::{Backend, BackendKind, Dtype, GpuOptions, RmsPropConfig};

#[test]
fn every_trace_matches_keras_on_cpu() {
    let traces = common::traces();
    assert!(
        traces.len() >= 21,
        "expected the 21 public traces, found {}",
        traces.len()
    );
    let mut failures = Vec::new();
    for (file, trace) in &traces {
        let expected = trace.expected.as_ref().expect("trace has expected results");
        let (backend, got) = trace.replay(Backend::Cpu, &GpuOptions::default()).unwrap();
        assert_eq!(backend, BackendKind::Cpu);
        if let Some(m) = first_mismatch(&got, expected) {
            failures.push(format!("{file}: {m}"));
        }
    }
    assert!(
        failures.is_empty(),
        "CPU mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_trace_matches_keras_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut failures = Vec::new();
    for (file, trace) in &common::traces() {
        let expected = trace.expected.as_ref().unwrap();
        let (backend, got) = trace.replay(Backend::Gpu, &common::on(&ctx)).unwrap();
        assert_eq!(backend, BackendKind::Gpu);
        if let Some(m) = first_mismatch(&got, expected) {
            failures.push(format!("{file}: {m}"));
        }
    }
    assert!(
        failures.is_empty(),
        "GPU mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_trace_config_round_trips_through_keras_json() {
    for path in common::trace_paths() {
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let config = RmsPropConfig::from_keras_json(&v["config"]).unwrap();
        let written = config.to_keras_json().unwrap();
        assert_eq!(written, v["config"], "{}", path.display());
        // key order is Keras' too
        let keys: Vec<&String> = written.as_object().unwrap().keys().collect();
        let orig: Vec<&String> = v["config"].as_object().unwrap().keys().collect();
        assert_eq!(keys, orig, "{}", path.display());
    }
}

/// Every trace with its gradients rounded to bf16 and to f16 and fed in that dtype
/// gives, on each backend, the very bits of the f32 replay of the rounded gradients
/// (the step of the upcast gradients, which the f32 traces hold to Keras), and the two
/// backends agree within FORMAT.md's tolerance.
#[test]
fn every_trace_replays_in_16_bit_gradients_on_both_backends() {
    let ctx = common::gpu();
    let mut failures = Vec::new();
    for (file, trace) in &common::traces() {
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let reference = trace.rounded(dtype);
            let backends = common::backends(ctx.as_ref());
            let mut outcomes = Vec::new();
            for (backend, gpu) in &backends {
                let (_, got) = trace.replay_in(*backend, gpu, dtype).unwrap();
                let (_, want) = reference.replay(*backend, gpu).unwrap();
                let same_bits = got.iterations == want.iterations
                    && got
                        .variables
                        .iter()
                        .flatten()
                        .zip(want.variables.iter().flatten())
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                if !same_bits {
                    failures.push(format!("{file} {dtype} {backend:?}: differs from the f32 replay of the rounded gradients"));
                }
                outcomes.push(got);
            }
            if let [cpu, gpu] = outcomes.as_slice() {
                if let Some(m) = first_mismatch(gpu, cpu) {
                    failures.push(format!("{file} {dtype}: gpu vs cpu: {m}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every trace replayed with a bf16 and an f16 parameter copy: the variables are the
/// plain replay's, bit for bit, and the copy is them rounded to nearest, ties to even.
#[test]
fn every_trace_replays_with_a_parameter_copy_on_both_backends() {
    use fused_rmsprop::half::{bf16, f16};
    use fused_rmsprop::Precision;
    let ctx = common::gpu();
    let backends = common::backends(ctx.as_ref());
    for (file, trace) in &common::traces() {
        for (backend, gpu) in &backends {
            let (_, plain) = trace.replay(*backend, gpu).unwrap();
            for dtype in [Dtype::Bf16, Dtype::F16] {
                let precision = Precision::default().with_param_copy(dtype);
                let (_, got) = trace.replay_with(*backend, gpu, precision).unwrap();
                let bits = |v: &[Vec<f32>]| -> Vec<u32> {
                    v.iter().flatten().map(|x| x.to_bits()).collect()
                };
                assert_eq!(
                    bits(&got.variables),
                    bits(&plain.variables),
                    "{file} {backend:?} {dtype}"
                );
                let round = |x: f32| match dtype {
                    Dtype::Bf16 => bf16::from_f32(x).to_f32(),
                    _ => f16::from_f32(x).to_f32(),
                };
                let want: Vec<Vec<f32>> = plain
                    .variables
                    .iter()
                    .map(|v| v.iter().map(|&x| round(x)).collect())
                    .collect();
                let copy = got.param_copy.expect("a copy");
                for (a, b) in copy.iter().flatten().zip(want.iter().flatten()) {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{file} {backend:?} {dtype}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
