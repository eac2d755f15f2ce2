//! Building blocks with Hugging Face's parameter names: `Linear`, `RmsNorm`, `Embedding`.

use burn::module::{Module, Param};
use burn::tensor::{Device, FloatDType, Int, Tensor};

use crate::quant::{f16_matmul, int8_channels, int8_dequantize, int8_matmul};

/// A dense projection `y = x · W (+ b)`, named like Hugging Face's `nn.Linear` (`weight`, `bias`).
///
/// The weight is stored `[in_features, out_features]`, the transpose of PyTorch's layout (as burn's own `Linear`
/// does): a transposed view would make the CPU backend copy every weight matrix on every call. Loading and export
/// transpose once.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[in_features, out_features]` (PyTorch's `weight.T`), full precision or frozen low precision.
    pub weight: LinearWeight,
    /// `[out_features]`, when the projection has a bias.
    pub bias: Option<Param<Tensor<1>>>,
    /// A low-rank update added to the output, when LoRA targets this projection.
    pub lora: Option<LoraBranch>,
    /// Mixed precision: the product runs in f16 (input and weight cast, output back to f32).
    #[module(skip)]
    pub(crate) half: bool,
}

/// LoRA's trainable low-rank update `scale · dropout(x) · A · B` (PEFT's `lora_A`, `lora_B`), stored transposed
/// like [`Linear::weight`].
#[derive(Module, Debug)]
pub struct LoraBranch {
    /// `[in_features, r]` (PEFT's `lora_A.weight`, `[r, in]`, transposed).
    pub lora_a: Param<Tensor<2>>,
    /// `[r, out_features]` (PEFT's `lora_B.weight`, `[out, r]`, transposed).
    pub lora_b: Param<Tensor<2>>,
    /// Dropout on the branch's input (only while training on an autodiff device).
    pub dropout: burn::nn::Dropout,
    /// `lora_alpha / r` (or `/ √r` with rsLoRA).
    #[module(skip)]
    pub scale: f64,
}

/// A projection matrix `[in, out]`: full precision (trainable or not), or frozen int8/f16 that products read
/// directly (gradients flow to the input only).
#[derive(Module, Debug)]
pub enum LinearWeight {
    /// f32.
    Dense(Param<Tensor<2>>),
    /// int8 codes with one scale per output column.
    Int8(Int8Weight),
    /// f16.
    F16(Param<Tensor<2>>),
}

/// Frozen int8 weight: `W[i][j] = q[i][j] · scale[j]`.
#[derive(Module, Debug)]
pub struct Int8Weight {
    /// The codes: i8 `[in, out]` on the CPU; on wgpu `[out, ⌈in/4⌉]` i32 words of four codes (WGSL has no i8).
    pub q: Param<Tensor<2, Int>>,
    /// `[out]`.
    pub scale: Param<Tensor<1>>,
    /// Input width (the codes' shape depends on the device).
    #[module(skip)]
    pub in_features: usize,
}

impl LinearWeight {
    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            LinearWeight::Dense(w) | LinearWeight::F16(w) => w.dims(),
            LinearWeight::Int8(w) => [w.in_features, w.scale.dims()[0]],
        }
    }

    /// The matrix in f32 (a copy for low-precision weights; for export and merging).
    pub fn to_f32(&self) -> Tensor<2> {
        match self {
            LinearWeight::Dense(w) => w.val(),
            LinearWeight::F16(w) => w.val().cast(burn::tensor::FloatDType::F32),
            LinearWeight::Int8(w) => int8_dequantize(w.q.val(), w.scale.val(), w.in_features),
        }
    }

    /// The output channels `ids` in f32: rows of `Wᵀ`, `[n, in]` (an embedding lookup through a frozen table).
    fn channels(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match self {
            LinearWeight::Dense(w) => w.val().select(1, ids).transpose(),
            LinearWeight::F16(w) => w.val().select(1, ids).transpose().cast(FloatDType::F32),
            LinearWeight::Int8(w) => int8_channels(w.q.val(), w.scale.val(), w.in_features, ids),
        }
    }

    /// The trainable matrix, when full precision.
    pub fn dense(&self) -> Option<&Param<Tensor<2>>> {
        match self {
            LinearWeight::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// `x · W`.
    ///
    /// # Shapes
    /// - `x`: `[..., in]` → `[..., out]`
    fn matmul<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let flat = |x: Tensor<D>| {
            let dims = x.dims();
            let m = dims[..D - 1].iter().product();
            (x.reshape([m, dims[D - 1]]), dims)
        };
        let out = self.dims()[1];
        let (y, mut dims) = match self {
            LinearWeight::Dense(w) => {
                let w = w.val();
                let w = if x.dtype() == w.dtype() {
                    w
                } else {
                    w.cast(FloatDType::from(x.dtype()))
                };
                return burn::tensor::module::linear(x, w, None);
            }
            LinearWeight::Int8(w) => {
                let (x, dims) = flat(x);
                (int8_matmul(x, w.q.val(), w.scale.val()), dims)
            }
            LinearWeight::F16(w) => {
                let (x, dims) = flat(x);
                (f16_matmul(x, w.val()), dims)
            }
        };
        dims[D - 1] = out;
        y.reshape(dims)
    }
}

impl Linear {
    /// Wraps loaded tensors; `weight` is `[in_features, out_features]`.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::with_weight(LinearWeight::Dense(Param::from_tensor(weight)), bias)
    }

    /// Wraps a weight in any precision.
    pub fn with_weight(weight: LinearWeight, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight,
            bias: bias.map(Param::from_tensor),
            lora: None,
            half: false,
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// - `x`: `[..., in_features]` → `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut y = if self.half {
            self.weight
                .matmul(x.clone().cast(FloatDType::F16))
                .cast(FloatDType::F32)
        } else {
            self.weight.matmul(x.clone())
        };
        if let Some(b) = &self.bias {
            y = y.add(b.val().unsqueeze());
        }
        match &self.lora {
            Some(l) => {
                let low = burn::tensor::module::linear(l.dropout.forward(x), l.lora_a.val(), None);
                y.add(burn::tensor::module::linear(low, l.lora_b.val(), None).mul_scalar(l.scale))
            }
            None => y,
        }
    }
}

/// Root-mean-square layer norm as in LLaMA: `x / sqrt(mean(x²) + eps) · weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[hidden]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the square root.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// Wraps a loaded weight.
    pub fn new(weight: Tensor<1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        super::rmsnorm::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Token embedding table.
#[derive(Module, Debug)]
pub struct Embedding {
    /// The table, dense or frozen in low precision.
    pub weight: EmbeddingWeight,
}

/// An embedding table: dense in Hugging Face's layout, or frozen int8/f16 (an emulator with quantized embeddings)
/// stored as the tied LM head's projection, so the head multiplies through it directly.
#[derive(Module, Debug)]
pub enum EmbeddingWeight {
    /// f32 `[vocab, hidden]`.
    Dense(Param<Tensor<2>>),
    /// A frozen projection with `in` = hidden and `out` = vocab (`[hidden, vocab]`, see [`LinearWeight`]); a lookup
    /// reads the output channels of the ids.
    Frozen(LinearWeight),
}

impl Embedding {
    /// Wraps a loaded `[vocab, hidden]` table.
    pub fn new(weight: Tensor<2>) -> Self {
        Self {
            weight: EmbeddingWeight::Dense(Param::from_tensor(weight)),
        }
    }

    /// Wraps a frozen low-precision table (`in` = hidden, `out` = vocab).
    pub fn frozen(weight: LinearWeight) -> Self {
        Self {
            weight: EmbeddingWeight::Frozen(weight),
        }
    }

    /// `[vocab, hidden]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.weight {
            EmbeddingWeight::Dense(w) => w.dims(),
            EmbeddingWeight::Frozen(w) => {
                let [h, v] = w.dims();
                [v, h]
            }
        }
    }

    /// The table in f32, `[vocab, hidden]` (a copy when frozen; for export).
    pub fn to_f32(&self) -> Tensor<2> {
        match &self.weight {
            EmbeddingWeight::Dense(w) => w.val(),
            EmbeddingWeight::Frozen(w) => w.to_f32().transpose(),
        }
    }

    /// The device the table lives on.
    pub fn device(&self) -> Device {
        match &self.weight {
            EmbeddingWeight::Dense(w) | EmbeddingWeight::Frozen(LinearWeight::Dense(w) | LinearWeight::F16(w)) => {
                w.device()
            }
            EmbeddingWeight::Frozen(LinearWeight::Int8(w)) => w.scale.device(),
        }
    }

    /// # Shapes
    /// - `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match &self.weight {
            EmbeddingWeight::Dense(w) => burn::tensor::module::embedding(w.val(), ids),
            EmbeddingWeight::Frozen(w) => {
                let [b, s] = ids.dims();
                let hidden = w.dims()[0];
                w.channels(ids.reshape([b * s])).reshape([b, s, hidden])
            }
        }
    }

    /// The tied LM head: `hidden · Eᵀ`, in f16 when `half` (mixed precision).
    ///
    /// # Shapes
    /// - `hidden`: `[m, hidden]` → `[m, vocab]`
    pub(crate) fn head(&self, hidden: Tensor<2>, half: bool) -> Tensor<2> {
        let f16 = FloatDType::F16;
        match &self.weight {
            EmbeddingWeight::Dense(w) => {
                // `E · hᵀ` then transpose the (small) activation, never the `[vocab, hidden]` table.
                let (table, flat) = (w.val(), hidden.transpose());
                let logits = if half {
                    table.cast(f16).matmul(flat.cast(f16)).cast(FloatDType::F32)
                } else {
                    table.matmul(flat)
                };
                logits.transpose()
            }
            EmbeddingWeight::Frozen(w) if half => w.matmul(hidden.cast(f16)).cast(FloatDType::F32),
            EmbeddingWeight::Frozen(w) => w.matmul(hidden),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn rms_norm_matches_formula() {
        let device = Device::flex();
        let x = Tensor::<3>::from_floats([[[1.0, 2.0, 3.0, 4.0]]], &device);
        let w = Tensor::<1>::from_floats([1.0, 0.5, 2.0, 1.0], &device);
        let y = RmsNorm::new(w, 1e-5)
            .forward(x)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let rms = ((1.0f32 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-5).sqrt();
        let expected = [1.0 / rms, 2.0 * 0.5 / rms, 3.0 * 2.0 / rms, 4.0 / rms];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn linear_uses_in_out_layout() {
        let device = Device::flex();
        let w = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]], &device);
        let b = Tensor::<1>::from_floats([0.5, -1.0], &device);
        let lin = Linear::new(w, Some(b));
        assert_eq!(lin.out_features(), 2);
        let y = lin.forward(Tensor::<3>::from_floats([[[1.0, 2.0, 3.0]]], &device));
        assert_eq!(y.into_data().try_into_vec::<f32>().unwrap(), vec![1.5, 6.0]);
    }
}
