//! Which implementation computes the experts of a [`DMoe`](crate::DMoe).

use serde::{Deserialize, Serialize};

/// The expert-computation path of a dMoE layer.
///
/// Every variant is dropless: each token reaches all of its `k` experts, however uneven the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoeKernel {
    /// Standard Burn tensor ops: sort the (token, slot) pairs by expert, gather, one matmul per
    /// expert segment, weighted scatter-add. Runs on every backend; the ground truth for the others.
    #[default]
    Reference,
    /// ScatterMoE-style: permute rows into expert order, one grouped matmul per projection over the
    /// expert segments, weighted combine; each op is a [`MoeBackend`](crate::MoeBackend) op with an
    /// adjoint backward (CubeCL kernels on CubeCL backends, standard ops elsewhere).
    Scatter,
}

impl MoeKernel {
    /// Every kernel, for tests and command-line help.
    pub const ALL: [MoeKernel; 2] = [MoeKernel::Reference, MoeKernel::Scatter];

    /// The name used on command lines and in configs.
    pub fn name(self) -> &'static str {
        match self {
            MoeKernel::Reference => "reference",
            MoeKernel::Scatter => "scatter",
        }
    }
}

impl std::fmt::Display for MoeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MoeKernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown MoE kernel '{s}' (expected one of: {})", names.join(", "))
            })
    }
}
