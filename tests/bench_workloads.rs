//! The benchmark workloads (`benches/support/workload.rs`, shared by the criterion bench
//! and `examples/throughput.rs`): variant names, the memory-traffic floor, model sizes.

#[path = "../benches/support/workload.rs"]
mod workload;

use workload::{synthetic_model, BenchVariant};

#[test]
fn names_parse_and_round_trip() {
    for base in BenchVariant::BASES {
        for suffix in ["", "+clip", "+ema", "+clip+ema"] {
            let name = format!("{base}{suffix}");
            assert_eq!(BenchVariant::parse(&name).unwrap().name(), name);
        }
    }
    assert!(BenchVariant::parse("adam").is_err());
    assert!(BenchVariant::parse("plain+fast").is_err());
}

#[test]
fn floor_bytes_follow_the_issue() {
    let b = |n| BenchVariant::parse(n).unwrap().bytes_per_param();
    assert_eq!(b("plain"), 20);
    assert_eq!(b("momentum"), 28);
    assert_eq!(b("centered"), 28);
    assert_eq!(b("centered-momentum"), 36);
    assert_eq!(b("plain+clip+ema"), 32);
}

#[test]
fn synthetic_model_sizes() {
    let m = synthetic_model(10, 3);
    assert_eq!(
        m.iter().map(|v| v.values.len()).collect::<Vec<_>>(),
        [4, 3, 3]
    );
}
