//! The instruction-set levels the CPU path's loops are compiled for, and which of them
//! this processor has.

use std::str::FromStr;

/// An instruction-set level of the CPU path.
///
/// The CPU loops (the fused update, the norm reduction, the non-finite scan) are
/// compiled once per level, and each process runs them at the best level its processor
/// has, chosen at run time: a plain `cargo build --release` gets the machine's full
/// vector width. Every level gives bit-identical results (the loops are element-wise or
/// reduce in fixed lanes, Rust never fuses `a * b + c` into an FMA, and IEEE square root
/// and division round the same at any width); only a NaN's sign and payload, which IEEE
/// 754 leaves unspecified, may differ.
///
/// To run at a lower level (to reproduce a result from another machine), set
/// `FUSED_RMSPROP_CPU_LEVEL=baseline|avx2|avx512` before the first optimizer is built,
/// or call [`RmsProp::set_cpu_level`](crate::RmsProp::set_cpu_level). The level chosen
/// is logged once, at debug level.
///
/// ```
/// use fused_rmsprop::{Backend, CpuLevel, RmsProp, RmsPropConfig, Variable};
/// let w = Variable::new("w", &[3], vec![1.0, 2.0, 3.0]).unwrap();
/// let mut opt = RmsProp::with_backend(RmsPropConfig::default(), vec![w], Backend::Cpu).unwrap();
/// assert!(opt.cpu_level().unwrap() <= CpuLevel::best());
/// opt.set_cpu_level(CpuLevel::Baseline).unwrap(); // always supported
/// assert_eq!(opt.cpu_level(), Some(CpuLevel::Baseline));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    /// The target's baseline: SSE2 on x86-64, NEON on aarch64.
    Baseline,
    /// x86-64 with AVX2 and FMA (FMA is enabled, never used to fuse).
    Avx2,
    /// x86-64 with AVX-512 F, VL, BW and DQ (and AVX2, FMA).
    Avx512,
}

impl CpuLevel {
    /// Every level, lowest first.
    pub const ALL: [CpuLevel; 3] = [CpuLevel::Baseline, CpuLevel::Avx2, CpuLevel::Avx512];

    /// `"baseline"`, `"avx2"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Baseline => "baseline",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512 => "avx512",
        }
    }

    /// True when this processor (and its operating system) supports the level.
    pub fn is_supported(self) -> bool {
        match self {
            CpuLevel::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx512 => {
                CpuLevel::Avx2.is_supported()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best level this processor supports.
    pub fn best() -> CpuLevel {
        CpuLevel::ALL
            .into_iter()
            .rev()
            .find(|l| l.is_supported())
            .unwrap_or(CpuLevel::Baseline)
    }
}

impl std::fmt::Display for CpuLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CpuLevel::ALL
            .into_iter()
            .find(|l| l.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown CPU level `{s}` (baseline, avx2 or avx512)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_order_and_detect() {
        for l in CpuLevel::ALL {
            assert_eq!(l.name().parse::<CpuLevel>(), Ok(l));
        }
        assert_eq!(" AVX2 ".parse::<CpuLevel>(), Ok(CpuLevel::Avx2));
        assert!("sse4".parse::<CpuLevel>().is_err());
        assert!(CpuLevel::Baseline < CpuLevel::Avx2 && CpuLevel::Avx2 < CpuLevel::Avx512);
        let best = CpuLevel::best();
        // every level up to the best is supported, none above it
        for l in CpuLevel::ALL {
            assert_eq!(l.is_supported(), l <= best, "{l}");
        }
    }
}
