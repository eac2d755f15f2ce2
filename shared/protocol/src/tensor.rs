//! Tensors on the wire: raw little-endian bytes in f32, f16 or int8 with one f32 scale per row (symmetric). The
//! receiver checks every size against the declared shape and rejects non-finite values.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use super::ProtocolError;

/// How tensor values travel. The server names it in each task; the client encodes its update with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// 2 bytes per value (IEEE half).
    F16,
    /// 1 byte per value plus one f32 scale per row (the last dimension is the row).
    Int8,
}

/// A tensor's values in one encoding.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum WireData {
    /// Little-endian f32.
    F32(Vec<u8>),
    /// Little-endian IEEE half.
    F16(Vec<u8>),
    /// Signed bytes, and one little-endian f32 scale per row: value = byte × scale.
    Int8 {
        /// One byte per value.
        values: Vec<u8>,
        /// One f32 per row.
        scales: Vec<u8>,
    },
}

/// A named tensor.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct WireTensor {
    /// The parameter's Hugging Face name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<u32>,
    /// Its values.
    pub data: WireData,
}

/// Named tensors (an adapter state or an update), in name order.
pub type TensorSet = Vec<WireTensor>;

fn row_len(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1).max(1)
}

impl WireTensor {
    /// Encodes `values` (row-major, `shape`) in `encoding`.
    pub fn encode(name: &str, shape: &[usize], values: &[f32], encoding: Encoding) -> Self {
        let data = match encoding {
            Encoding::F32 => WireData::F32(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            Encoding::F16 => WireData::F16(
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            Encoding::Int8 => {
                let row = row_len(shape);
                let mut q = Vec::with_capacity(values.len());
                let mut scales = Vec::with_capacity(values.len() / row * 4);
                for chunk in values.chunks(row) {
                    let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                    scales.extend_from_slice(&scale.to_le_bytes());
                    q.extend(
                        chunk
                            .iter()
                            .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
                WireData::Int8 { values: q, scales }
            }
        };
        WireTensor {
            name: name.to_string(),
            shape: shape.iter().map(|&d| d as u32).collect(),
            data,
        }
    }

    /// The encoding this tensor travels in.
    pub fn encoding(&self) -> Encoding {
        match self.data {
            WireData::F32(_) => Encoding::F32,
            WireData::F16(_) => Encoding::F16,
            WireData::Int8 { .. } => Encoding::Int8,
        }
    }

    /// Bytes of payload.
    pub fn byte_len(&self) -> usize {
        match &self.data {
            WireData::F32(b) | WireData::F16(b) => b.len(),
            WireData::Int8 { values, scales } => values.len() + scales.len(),
        }
    }

    /// The shape as `usize`.
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }

    /// Decodes the values, checking their count against the shape and that every one is finite.
    pub fn decode(&self) -> Result<Vec<f32>, ProtocolError> {
        let bad = |reason: String| ProtocolError::Tensor {
            name: self.name.clone(),
            reason,
        };
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d as usize))
            .ok_or_else(|| bad(format!("shape {:?} overflows", self.shape)))?;
        // Every size computed from the wire is checked: a shape of [2^31, 2^31] must be an error, not an overflow.
        let expect = |got: usize, per: usize| match n.checked_mul(per) {
            Some(want) if want == got => Ok(()),
            Some(want) => Err(bad(format!("{got} bytes for shape {:?} ({want} expected)", self.shape))),
            None => Err(bad(format!(
                "shape {:?} needs more bytes than this machine can address",
                self.shape
            ))),
        };
        let values: Vec<f32> = match &self.data {
            WireData::F32(b) => {
                expect(b.len(), 4)?;
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            WireData::F16(b) => {
                expect(b.len(), 2)?;
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
            WireData::Int8 { values, scales } => {
                expect(values.len(), 1)?;
                let row = row_len(&self.dims());
                let rows = n / row;
                if scales.len() != rows * 4 {
                    return Err(bad(format!("{} scale bytes for {rows} rows", scales.len())));
                }
                let scales: Vec<f32> = scales
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| q as i8 as f32 * scales[i / row])
                    .collect()
            }
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("value {i} is not finite ({})", values[i])));
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_within_their_precision() {
        let values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.37).collect();
        let exact = WireTensor::encode("w", &[4, 6], &values, Encoding::F32);
        assert_eq!(exact.decode().unwrap(), values);
        assert_eq!(exact.byte_len(), 96);
        let f16 = WireTensor::encode("w", &[4, 6], &values, Encoding::F16);
        assert_eq!(f16.byte_len(), 48);
        for (a, b) in f16.decode().unwrap().iter().zip(&values) {
            assert!((a - b).abs() <= b.abs() * 1e-3, "{a} vs {b}");
        }
        let q = WireTensor::encode("w", &[4, 6], &values, Encoding::Int8);
        assert_eq!(q.byte_len(), 24 + 16);
        for (r, row) in values.chunks(6).enumerate() {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in q.decode().unwrap()[r * 6..r * 6 + 6].iter().zip(row) {
                assert!((a - b).abs() <= max / 127.0 * 0.5 + 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn inconsistent_or_non_finite_tensors_are_named() {
        let mut t = WireTensor::encode("layer.w", &[2, 2], &[1.0, 2.0, 3.0, 4.0], Encoding::F32);
        t.shape = vec![2, 3];
        let e = t.decode().unwrap_err().to_string();
        assert!(e.contains("layer.w") && e.contains("16 bytes"), "{e}");
        let nan = WireTensor::encode("b", &[2], &[1.0, f32::NAN], Encoding::F32);
        assert!(nan.decode().unwrap_err().to_string().contains("value 1 is not finite"));
        let mut q = WireTensor::encode("q", &[2, 2], &[1.0, 2.0, 3.0, 4.0], Encoding::Int8);
        if let WireData::Int8 { scales, .. } = &mut q.data {
            scales.pop();
        }
        assert!(q.decode().unwrap_err().to_string().contains("scale bytes"));
        let huge = WireTensor {
            name: "h".into(),
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            data: WireData::F32(vec![]),
        };
        assert!(huge.decode().unwrap_err().to_string().contains("overflows"));
        // 2^62 elements fit a usize, their f32 bytes do not (the f16 ones just do): errors, never an overflow panic.
        for (data, says) in [
            (WireData::F32(vec![]), "more bytes than"),
            (WireData::F16(vec![]), "0 bytes for shape"),
        ] {
            let t = WireTensor {
                name: "big".into(),
                shape: vec![1 << 31, 1 << 31],
                data,
            };
            let e = t.decode().unwrap_err().to_string();
            assert!(e.contains("big") && e.contains(says), "{e}");
        }
    }
}
