//! Validates every WGSL shader in `shaders/` with naga, and holds `rmsprop.wgsl` to its
//! contract with the host (`src/gpu/contract.rs`, compiled here too): the overrides it
//! declares are exactly the contract's, every specialization the contract lists
//! compiles, and every code just past an override's values is refused. So a broken
//! shader, a misspelt override or a code the shader does not handle fails the build
//! with its file and line.

use std::path::Path;

use naga::back::pipeline_constants::process_overrides;
use naga::back::PipelineConstants;
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};

#[allow(dead_code)]
mod contract {
    include!("src/gpu/contract.rs");
}

fn fail(msg: String) -> ! {
    eprintln!("{msg}");
    println!("cargo:warning=shader validation failed: see the error above");
    std::process::exit(1);
}

/// Specializes every entry point of `module` with `values`: the first failure.
fn specialize(module: &naga::Module, info: &ModuleInfo, values: &[(&str, f64)]) -> Option<String> {
    let constants: PipelineConstants = values.iter().map(|&(n, v)| (n.to_string(), v)).collect();
    module.entry_points.iter().find_map(|ep| {
        process_overrides(
            module,
            info,
            Some((naga::ShaderStage::Compute, &ep.name)),
            &constants,
        )
        .err()
        .map(|e| format!("entry point `{}` with {constants:?}: {e:?}", ep.name))
    })
}

fn parse(path: &Path) -> (String, naga::Module, ModuleInfo) {
    let name = path.display().to_string();
    let source =
        std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("cannot read {name}: {e}")));
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| fail(e.emit_to_string_with_path(&source, &name)));
    let mut validator = Validator::new(ValidationFlags::all(), Capabilities::all());
    let info = validator
        .validate(&module)
        .unwrap_or_else(|e| fail(e.emit_to_string_with_path(&source, &name)));
    (name, module, info)
}

/// `rmsprop.wgsl` against the contract.
fn check_contract(path: &Path) {
    let (name, module, info) = parse(path);
    let mut declared: Vec<&str> = module
        .overrides
        .iter()
        .filter_map(|(_, o)| o.name.as_deref())
        .collect();
    let mut expected: Vec<&str> = contract::OVERRIDES
        .iter()
        .map(|o| o.name)
        .chain(contract::DERIVED_OVERRIDES)
        .collect();
    declared.sort_unstable();
    expected.sort_unstable();
    if declared != expected {
        fail(format!(
            "{name}: its overrides {declared:?} differ from src/gpu/contract.rs {expected:?}"
        ));
    }
    let mut entry_points: Vec<&str> = module
        .entry_points
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    let mut expected_eps = contract::ENTRY_POINTS.to_vec();
    entry_points.sort_unstable();
    expected_eps.sort_unstable();
    if entry_points != expected_eps {
        fail(format!(
            "{name}: entry points {entry_points:?}, src/gpu/contract.rs says {expected_eps:?}"
        ));
    }
    for values in contract::specializations() {
        if let Some(e) = specialize(&module, &info, &values) {
            fail(format!("{name}: fails to specialize: {e}"));
        }
    }
    // a code just past an override's values must be refused (CODES_HANDLED)
    for o in contract::OVERRIDES {
        if o.values == [0.0, 1.0] {
            continue; // a bool
        }
        let past = o.values.iter().fold(0.0f64, |m, &v| m.max(v)) + 1.0;
        if specialize(&module, &info, &[(o.name, past)]).is_none() {
            fail(format!(
                "{name}: `{}` = {past} is not in src/gpu/contract.rs, yet the shader accepts it (CODES_HANDLED must refuse it)",
                o.name
            ));
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/gpu/contract.rs");
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
        if p.file_name().is_some_and(|f| f == "rmsprop.wgsl") {
            check_contract(p);
        } else {
            let (name, module, info) = parse(p);
            if let Some(e) = specialize(&module, &info, &[]) {
                fail(format!("{name}: {e}"));
            }
        }
    }
}
