//! Shared helpers of burn-moe's cross-crate tests: fixture paths, safetensors reading, error metrics.
//!
//! The tests themselves live in `tests/tests/`: HF parity of the whole model against transformers
//! outputs (`hf_parity.rs`), checkpoint loader errors and round trips (`checkpoint.rs`), and the dropless
//! MoE against independent dense computations (`moe_reference.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The CPU backend the tests run on (f32).
pub type Cpu = burn::backend::NdArray<f32>;
/// [`Cpu`] with autodiff.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// `tests/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every fixture case (a folder with `model/`, `input_ids.safetensors`, `expected.safetensors`).
pub fn fixture_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    cases.sort();
    cases
}

/// A host tensor read from a safetensors file.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values converted to f32.
    pub data: Vec<f32>,
}

/// Reads every float tensor of a safetensors file as f32.
pub fn read_f32_tensors(path: &Path) -> BTreeMap<String, HostTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                other => panic!("{}: tensor {name} has dtype {other:?}, expected F32", path.display()),
            };
            (name, HostTensor { shape: view.shape().to_vec(), data })
        })
        .collect()
}

/// `‖a − b‖₂ / ‖b‖₂` (absolute L2 error when `b` is zero).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// Deterministic pseudo-random values in `[-scale, scale)` (SplitMix64), so tests need no RNG crate.
pub fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
