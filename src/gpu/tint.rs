//! Every shader through a second WGSL compiler: Dawn's Tint (Chrome's), run by
//! `tests/tint/check.mjs` through the `webgpu` npm package on its `null` backend, on a
//! device with WebGPU's default limits. The crate's shader is compiled with the
//! contract's bindings for every specialization `build.rs` validates with naga; the
//! example's MLP shader with layout `auto` for every combination of its boolean
//! overrides.
//!
//! Needs `node` and `npm install` run in `tests/tint` (`.ci/run` does both). Without
//! them the test says so loudly, and under CI (`CI` set) fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use wgpu::naga;

use crate::gpu::contract::{self, BindingKind};
use crate::gpu::shader::SHADER_SOURCE;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The job for the crate's shader.
fn rmsprop_job() -> Value {
    let bindings: Vec<Value> = contract::BINDINGS
        .iter()
        .map(|b| {
            let kind = match b.kind {
                BindingKind::Uniform => "uniform",
                BindingKind::ReadOnlyStorage => "read-only-storage",
                BindingKind::Storage => "storage",
            };
            json!({ "binding": b.number, "kind": kind })
        })
        .collect();
    let specializations: Vec<Value> = contract::specializations()
        .into_iter()
        .map(|s| {
            Value::Object(
                s.into_iter()
                    .map(|(n, v)| (n.to_string(), json!(v)))
                    .collect(),
            )
        })
        .collect();
    // a code just past each override's values: Tint must refuse it (CODES_HANDLED)
    let refused: Vec<Value> = contract::OVERRIDES
        .iter()
        .filter(|o| o.values != [0.0, 1.0])
        .map(|o| {
            let past = o.values.iter().fold(0.0f64, |m, &v| m.max(v)) + 1.0;
            json!({ o.name: past })
        })
        .collect();
    json!({
        "name": "shaders/rmsprop.wgsl",
        "code": SHADER_SOURCE,
        "entryPoints": contract::ENTRY_POINTS,
        "bindings": bindings,
        "specializations": specializations,
        "refused": refused,
    })
}

/// A shader outside the contract: its entry points and every combination of its
/// boolean overrides, with layout `auto`.
fn other_job(path: &Path) -> Value {
    let code = std::fs::read_to_string(path).expect("the shader is readable");
    let module = naga::front::wgsl::parse_str(&code).expect("naga parses it (build.rs checks)");
    let bools: Vec<String> = module
        .overrides
        .iter()
        .filter(|(_, o)| matches!(module.types[o.ty].inner, naga::TypeInner::Scalar(s) if s.kind == naga::ScalarKind::Bool))
        .filter_map(|(_, o)| o.name.clone())
        .collect();
    let specializations: Vec<Value> = (0..1u32 << bools.len())
        .map(|mask| {
            let m: serde_json::Map<String, Value> = bools
                .iter()
                .enumerate()
                .map(|(bit, n)| (n.clone(), json!((mask >> bit) & 1)))
                .collect();
            Value::Object(m)
        })
        .collect();
    let entry_points: Vec<&str> = module
        .entry_points
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    json!({
        "name": path.strip_prefix(repo()).unwrap_or(path).display().to_string(),
        "code": code,
        "entryPoints": entry_points,
        "specializations": specializations,
    })
}

#[test]
fn every_shader_compiles_with_tint_within_webgpu_default_limits() {
    let dir = repo().join("tests/tint");
    let ready = dir.join("node_modules/webgpu").is_dir()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ready {
        let why = "needs node and `npm install` in tests/tint (.ci/run does both)";
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the Tint check cannot run: {why}");
        }
        eprintln!("\n!!!!!! TINT CHECK SKIPPED: {why} !!!!!!\n");
        return;
    }
    let jobs = json!([
        rmsprop_job(),
        other_job(&repo().join("examples/train_mlp/mlp.wgsl")),
    ]);
    let file = std::env::temp_dir().join(format!("fused-rmsprop-tint-{}.json", std::process::id()));
    std::fs::write(&file, jobs.to_string()).expect("the job file is written");
    let out = Command::new("node")
        .arg(dir.join("check.mjs"))
        .arg(&file)
        .output()
        .expect("node runs");
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "Tint refused a shader:\n{stdout}{stderr}"
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
