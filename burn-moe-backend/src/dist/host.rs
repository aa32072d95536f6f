//! Host-side (`TensorData`) kernels of the in-process communicator: reduction with a fixed rank
//! order, and byte-level concatenation / slicing along one dimension.
//!
//! They work on raw bytes so every float dtype `TensorData` carries (`F64`, `F32`, `Flex32`, `F16`,
//! `BF16`) moves without conversion; only the reduction looks at values.

use std::ops::Range;

use burn::tensor::{DType, TensorData, bf16, f16};

use super::comm::ReduceOp;

/// Number of bytes per element of a dtype the in-process communicator can move, or a message
/// naming the dtype. Quantized and boolean data have no per-element byte layout that a
/// concatenation could preserve, so they are refused.
pub(crate) fn element_size(dtype: DType) -> Result<usize, String> {
    match dtype {
        DType::QFloat(_) => Err(format!("quantized dtype {dtype:?} is not supported")),
        DType::Bool(_) => Err(format!("bool dtype {dtype:?} is not supported")),
        other => Ok(other.size()),
    }
}

/// Element-wise reduction of `inputs` (one per rank, in rank order) on the host.
///
/// Accumulation is a left fold over the ranks in rank order (`((x0 + x1) + x2) + …`), so every rank
/// computing it from the same inputs gets bit-identical results. `F64` accumulates in `f64`;
/// `F32`/`Flex32` in `f32`; `F16`/`BF16` are widened to `f32`, summed (and averaged) there and
/// rounded back once, which is at least as accurate as reducing in the half type. `Avg` divides
/// the sum by the number of inputs. All inputs must have the shape and dtype of the first.
///
/// # Errors
/// A message naming the offending rank/dtype when the inputs are empty, disagree in shape or
/// dtype, or have a non-float dtype.
pub fn reduce_host(inputs: &[&TensorData], op: ReduceOp) -> Result<TensorData, String> {
    let first = inputs.first().ok_or("reduction over zero inputs")?;
    let dtype = first.dtype;
    for (rank, data) in inputs.iter().enumerate() {
        if data.dtype != dtype || data.shape != first.shape {
            return Err(format!(
                "rank {rank} has shape {:?} {:?}, rank 0 has {:?} {:?}",
                data.shape.as_slice(),
                data.dtype,
                first.shape.as_slice(),
                dtype
            ));
        }
    }
    let shape = first.shape.to_vec();
    let n = inputs.len();
    match dtype {
        DType::F64 => {
            let mut acc = first
                .as_slice::<f64>()
                .map_err(|e| format!("{e:?}"))?
                .to_vec();
            for data in &inputs[1..] {
                let xs = data.as_slice::<f64>().map_err(|e| format!("{e:?}"))?;
                acc.iter_mut().zip(xs).for_each(|(a, x)| *a += *x);
            }
            if op == ReduceOp::Avg {
                acc.iter_mut().for_each(|a| *a /= n as f64);
            }
            Ok(TensorData::new(acc, shape))
        }
        DType::F32 | DType::Flex32 | DType::F16 | DType::BF16 => {
            let mut acc = to_f32(first);
            for data in &inputs[1..] {
                let xs = to_f32(data);
                acc.iter_mut().zip(&xs).for_each(|(a, x)| *a += *x);
            }
            if op == ReduceOp::Avg {
                acc.iter_mut().for_each(|a| *a /= n as f32);
            }
            Ok(from_f32(acc, shape, dtype))
        }
        other => Err(format!("cannot reduce dtype {other:?} (float dtypes only)")),
    }
}

fn to_f32(data: &TensorData) -> Vec<f32> {
    // `Flex32` is stored as `f32` but `as_slice::<f32>` refuses it (dtype tag differs), so it
    // takes the byte view; `F16`/`BF16` are widened element by element.
    match data.dtype {
        DType::F32 | DType::Flex32 => data
            .as_bytes()
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => half_bytes(data)
            .map(|bits| f16::from_bits(bits).to_f32())
            .collect(),
        DType::BF16 => half_bytes(data)
            .map(|bits| bf16::from_bits(bits).to_f32())
            .collect(),
        _ => unreachable!("to_f32 is only called for f32-accumulated dtypes"),
    }
}

fn half_bytes(data: &TensorData) -> impl Iterator<Item = u16> + '_ {
    data.as_bytes()
        .chunks_exact(2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

fn from_f32(values: Vec<f32>, shape: Vec<usize>, dtype: DType) -> TensorData {
    match dtype {
        DType::F16 => TensorData::new(
            values.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        DType::BF16 => TensorData::new(
            values.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        DType::Flex32 => {
            let mut data = TensorData::new(values, shape);
            data.dtype = DType::Flex32;
            data
        }
        _ => TensorData::new(values, shape),
    }
}

/// `(outer, inner_bytes)` of a row-major tensor split at `dim`: the number of independent blocks
/// before `dim`, and the byte size of one index step along `dim`.
fn blocks(shape: &[usize], dim: usize, esize: usize) -> (usize, usize) {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * esize;
    (outer, inner)
}

/// Concatenates row-major byte buffers along `dim`. `shapes[i]` is the shape of `parts[i]`; all
/// shapes agree except along `dim` (checked by the caller).
pub(crate) fn concat_bytes(
    parts: &[&[u8]],
    shapes: &[&[usize]],
    dim: usize,
    esize: usize,
) -> (Vec<u8>, Vec<usize>) {
    let mut out_shape = shapes[0].to_vec();
    out_shape[dim] = shapes.iter().map(|s| s[dim]).sum();
    let (outer, inner) = blocks(&out_shape, dim, esize);
    let total = outer * out_shape[dim] * inner;
    let mut out = Vec::with_capacity(total);
    for o in 0..outer {
        for (part, shape) in parts.iter().zip(shapes) {
            let step = shape[dim] * inner;
            out.extend_from_slice(&part[o * step..(o + 1) * step]);
        }
    }
    debug_assert_eq!(out.len(), total);
    (out, out_shape)
}

/// Indices `range` along `dim` of a row-major byte buffer of `shape`.
pub(crate) fn slice_bytes(
    bytes: &[u8],
    shape: &[usize],
    dim: usize,
    range: Range<usize>,
    esize: usize,
) -> (Vec<u8>, Vec<usize>) {
    let (outer, inner) = blocks(shape, dim, esize);
    let step = shape[dim] * inner;
    let mut out = Vec::with_capacity(outer * range.len() * inner);
    for o in 0..outer {
        let base = o * step;
        out.extend_from_slice(&bytes[base + range.start * inner..base + range.end * inner]);
    }
    let mut out_shape = shape.to_vec();
    out_shape[dim] = range.len();
    (out, out_shape)
}
