//! `examples/train_mlp` trains on the GPU (lavapipe in CI) and on the CPU path, in f32
//! and in mixed precision (bf16 weights copy and gradients, f32 master weights): the
//! loss falls at least 10x on each, and the two backends end within 5% of each other.

#[path = "../examples/train_mlp/mlp.rs"]
mod mlp;

mod common;

use fused_rmsprop::{Backend, Dtype, StateDtype};

fn run(backend: Backend, precision: Dtype) -> mlp::Report {
    run_with(backend, precision, StateDtype::F32)
}

fn run_with(backend: Backend, precision: Dtype, state: StateDtype) -> mlp::Report {
    let options = mlp::TrainOptions {
        backend,
        steps: 100,
        batch: 32,
        every: 25,
        seed: 7,
        precision,
        state,
    };
    mlp::train(&options, |_, _| {}).unwrap()
}

#[test]
fn the_mlp_trains_alike_on_both_backends() {
    trains_alike(Dtype::F32);
}

#[test]
fn the_mlp_trains_alike_on_both_backends_in_bf16() {
    trains_alike(Dtype::Bf16);
}

fn trains_alike(precision: Dtype) {
    let run = |backend| run(backend, precision);
    let cpu = run(Backend::Cpu);
    assert_eq!(cpu.precision, precision.as_str());
    assert_eq!((cpu.backend, cpu.params), ("cpu", 142_088));
    assert!(
        cpu.first_loss >= 10.0 * cpu.final_loss,
        "cpu: the loss fell from {} to {} only",
        cpu.first_loss,
        cpu.final_loss
    );
    if common::gpu().is_none() {
        return;
    }
    let gpu = run(Backend::Gpu);
    assert_eq!(gpu.backend, "gpu");
    assert!(gpu.first_loss >= 10.0 * gpu.final_loss, "gpu: {gpu:?}");
    assert_eq!(gpu.dispatches_per_step, mlp::MODEL_DISPATCHES + 1);
    // same data, initialization and batches: the first loss agrees to float rounding
    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * a.abs().max(b.abs());
    assert!(
        close(gpu.first_loss, cpu.first_loss, 1e-4),
        "{} vs {}",
        gpu.first_loss,
        cpu.first_loss
    );
    assert!(
        close(gpu.final_loss, cpu.final_loss, 0.05),
        "final losses: gpu {} vs cpu {}",
        gpu.final_loss,
        cpu.final_loss
    );
    assert_eq!(gpu.losses.len(), cpu.losses.len());
}

/// Compact slots (bf16, int8 block-wise) train the MLP to within 10% of f32 slots'
/// final loss, on the CPU path and on the GPU, and take the memory they promise.
#[test]
fn compact_state_trains_within_ten_percent_of_f32_state() {
    let mut backends = vec![Backend::Cpu];
    if common::gpu().is_some() {
        backends.push(Backend::Gpu);
    }
    for backend in backends {
        let exact = run_with(backend, Dtype::F32, StateDtype::F32);
        for state in [StateDtype::Bf16, StateDtype::DYNAMIC8] {
            let compact = run_with(backend, Dtype::F32, state);
            assert_eq!(compact.state, state.as_str());
            let gap = (compact.final_loss - exact.final_loss).abs() / exact.final_loss;
            assert!(
                gap <= 0.10,
                "{backend:?} {state}: final loss {} vs {} with f32 state ({:.1}% apart)",
                compact.final_loss,
                exact.final_loss,
                100.0 * gap
            );
            // two slots (velocity, momentum): the three large kernels (98% of the
            // parameters) compact, the rest f32
            let share = compact.state_bytes as f64 / exact.state_bytes as f64;
            let promised = if state == StateDtype::Bf16 {
                0.52
            } else {
                0.28
            };
            assert!(
                share < promised,
                "{backend:?} {state}: {share} of f32 state's bytes"
            );
        }
    }
}
