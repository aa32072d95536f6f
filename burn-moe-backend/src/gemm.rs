//! Which library runs the expert GEMMs of the `scatter` kernel on CUDA tensors.
//!
//! The CubeCL grouped GEMMs (`kernels-cubecl`) are the default and the portable path (CUDA, wgpu). On
//! CUDA, the expert segments can instead go through cuBLAS (`cublasGemmEx` once per non-empty
//! segment, bf16/f16 operands with f32 accumulation), the vendor comparison point and fallback that
//! issue 4 asks for. The choice is process-wide, like a math-library mode: the backend ops are static
//! functions without a configuration argument, and one process trains one model. It is read from
//! `BURN_MOE_GROUPED_GEMM=cubecl|cublas` on first use, or set with [`set_grouped_gemm`], which checks
//! that cuBLAS can be used before anything runs.
//!
//! The choice only affects CUDA `CubeBackend` tensors (also under `Autodiff`); wgpu tensors, the
//! fusion-wrapped backend (whose MoE ops are standard Burn ops that the fusion engine records) and
//! the CPU backends ignore it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// The library behind the `scatter` kernel's grouped GEMMs on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupedGemm {
    /// `kernels-cubecl`'s grouped GEMMs (tensor cores for f16/bf16; on a Hopper GPU its `wgmma` + TMA
    /// kernel unless `BURN_MOE_WGMMA=0`): every runtime.
    #[default]
    #[serde(rename = "cubecl")]
    CubeCl,
    /// cuBLAS, one `cublasGemmEx` per non-empty expert segment (CUDA builds with the `cublas`
    /// feature; `libcublas.so.13` is loaded at run time).
    Cublas,
}

impl GroupedGemm {
    /// The name used on command lines and in `BURN_MOE_GROUPED_GEMM`.
    pub fn name(self) -> &'static str {
        match self {
            GroupedGemm::CubeCl => "cubecl",
            GroupedGemm::Cublas => "cublas",
        }
    }
}

impl fmt::Display for GroupedGemm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of [`GroupedGemm`] parsing and selection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupedGemmError {
    #[error("unknown grouped GEMM library `{0}` (expected `cubecl` or `cublas`)")]
    Unknown(String),
    #[error("cuBLAS grouped GEMMs need a build with burn-moe-backend's `cublas` feature (e.g. the trainer's `--features cuda`)")]
    NotBuilt,
    #[error("cuBLAS cannot be used: {0}")]
    Unavailable(String),
}

impl FromStr for GroupedGemm {
    type Err = GroupedGemmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cubecl" | "cube" => Ok(GroupedGemm::CubeCl),
            "cublas" => Ok(GroupedGemm::Cublas),
            other => Err(GroupedGemmError::Unknown(other.to_string())),
        }
    }
}

const UNSET: u8 = 0;
const CUBECL: u8 = 1;
const CUBLAS: u8 = 2;
static SELECTED: AtomicU8 = AtomicU8::new(UNSET);

/// Selects the grouped GEMM library for the rest of the process. Choosing cuBLAS loads the library
/// first, so a missing `libcublas` is an error here rather than a panic inside a training step.
pub fn set_grouped_gemm(gemm: GroupedGemm) -> Result<(), GroupedGemmError> {
    if gemm == GroupedGemm::Cublas {
        cublas_available()?;
    }
    SELECTED.store(if gemm == GroupedGemm::Cublas { CUBLAS } else { CUBECL }, Ordering::Relaxed);
    Ok(())
}

/// The selected library: [`set_grouped_gemm`]'s choice, else `BURN_MOE_GROUPED_GEMM`, else CubeCL.
/// An unusable environment value is reported once (tracing) and CubeCL is kept.
pub fn grouped_gemm() -> GroupedGemm {
    match SELECTED.load(Ordering::Relaxed) {
        CUBECL => GroupedGemm::CubeCl,
        CUBLAS => GroupedGemm::Cublas,
        _ => {
            let from_env = std::env::var("BURN_MOE_GROUPED_GEMM").ok().map(|v| v.parse::<GroupedGemm>().and_then(|g| {
                set_grouped_gemm(g)?;
                Ok(g)
            }));
            match from_env {
                Some(Ok(g)) => g,
                Some(Err(e)) => {
                    tracing::warn!("BURN_MOE_GROUPED_GEMM ignored, using cubecl: {e}");
                    SELECTED.store(CUBECL, Ordering::Relaxed);
                    GroupedGemm::CubeCl
                }
                None => {
                    SELECTED.store(CUBECL, Ordering::Relaxed);
                    GroupedGemm::CubeCl
                }
            }
        }
    }
}

#[cfg(feature = "cublas")]
fn cublas_available() -> Result<(), GroupedGemmError> {
    crate::ops::cublas_available().map_err(GroupedGemmError::Unavailable)
}

#[cfg(not(feature = "cublas"))]
fn cublas_available() -> Result<(), GroupedGemmError> {
    Err(GroupedGemmError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!("cuBLAS".parse::<GroupedGemm>(), Ok(GroupedGemm::Cublas));
        assert_eq!("cubecl".parse::<GroupedGemm>(), Ok(GroupedGemm::CubeCl));
        assert_eq!("cutlass".parse::<GroupedGemm>(), Err(GroupedGemmError::Unknown("cutlass".into())));
        assert_eq!(GroupedGemm::Cublas.to_string(), "cublas");
    }

    #[cfg(not(feature = "cublas"))]
    #[test]
    fn cublas_without_the_feature_is_a_clear_error() {
        let err = set_grouped_gemm(GroupedGemm::Cublas).unwrap_err();
        assert_eq!(err, GroupedGemmError::NotBuilt);
        assert!(err.to_string().contains("`cublas` feature"), "{err}");
        assert_eq!(grouped_gemm(), GroupedGemm::CubeCl);
    }
}
