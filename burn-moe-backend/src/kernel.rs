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
    /// MegaBlocks-style: rows permuted into expert order and padded per expert to a multiple of the
    /// block size ([`DMoe::with_block_size`](crate::DMoe::with_block_size)), up-projections as a block-sparse
    /// SDD, down-projection as a DSD on the same topology, weighted combine; [`MoeBackend`](crate::MoeBackend)
    /// ops with adjoint backward (CubeCL kernels on CubeCL backends, standard ops elsewhere).
    /// Also parsed from `megablocks`.
    #[serde(alias = "megablocks")]
    BlockSparse,
}

impl MoeKernel {
    /// Every kernel, for tests and command-line help.
    pub const ALL: [MoeKernel; 3] = [MoeKernel::Reference, MoeKernel::Scatter, MoeKernel::BlockSparse];

    /// The name used on command lines and in configs.
    pub fn name(self) -> &'static str {
        match self {
            MoeKernel::Reference => "reference",
            MoeKernel::Scatter => "scatter",
            MoeKernel::BlockSparse => "block-sparse",
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
        if s == "megablocks" {
            return Ok(MoeKernel::BlockSparse);
        }
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown MoE kernel '{s}' (expected one of: {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_megablocks_is_an_alias() {
        for k in MoeKernel::ALL {
            assert_eq!(k.name().parse::<MoeKernel>(), Ok(k));
        }
        assert_eq!("megablocks".parse::<MoeKernel>(), Ok(MoeKernel::BlockSparse));
        assert_eq!("block-sparse".parse::<MoeKernel>(), Ok(MoeKernel::BlockSparse));
        let err = "blocksparse".parse::<MoeKernel>().unwrap_err();
        assert!(err.contains("block-sparse") && err.contains("'blocksparse'"), "{err}");
    }
}
