//! Matrix products through frozen low-precision weights, as a burn backend extension: the forward `x · W` and the
//! input gradient `dy · Wᵀ` read the int8 (or f16) weight directly. Under autodiff the op records only handles to
//! the quantized weight, so no full-precision copy of a frozen matrix outlives a single product; the weight gets no
//! gradient.
//!
//! The default bodies (the CPU backend) widen the weight into a temporary that is dropped as soon as the product is
//! done. On wgpu the products take the route the autotuner measured fastest (`route.rs`): our WGSL kernels, which
//! read the packed int8 codes or f16 halves directly (`wgsl.rs`), or a transient widened copy and burn's matmul (an
//! f16 matrix with an odd element count, which does not fill whole u32 words, is always widened).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, AutodiffBackend, Backend, Cube, Flex, TensorMetadata};
use burn::tensor::{FloatDType, Shape, Slice};

/// Products with frozen weights stored `[in, out]`: int8 with one f32 scale per output column, or f16.
///
/// int8 codes are an i8 `[in, out]` tensor on the CPU. On wgpu (WGSL has no 8-bit integers) they keep PyTorch's
/// `[out, in]` layout with four consecutive inputs per i32 word (`[out, ⌈in/4⌉]`, byte `j` of word `w` is input
/// `4w + j`, rows padded with zero codes), which our WGSL kernels read directly.
#[backend_extension(Flex, Cube: cfg(all()), Autodiff)]
pub(crate) trait FrozenOps: Backend {
    /// The codes as f32, `[in, out]` (or `[out, in]` when `transposed`).
    fn int8_codes(q: IntTensor<Self>, inp: usize, out: usize, transposed: bool) -> FloatTensor<Self> {
        let _ = (inp, out);
        if transposed {
            // Transpose the narrow int8 matrix; the widening copy is then already contiguous.
            Self::int_into_float(Self::int_transpose(q), FloatDType::F32)
        } else {
            Self::int_into_float(q, FloatDType::F32)
        }
    }

    /// `x · (q ⊙ scale)`.
    ///
    /// # Shapes
    /// - `x`: `[m, in]`, `q`: `[in, out]` (stored as above), `scale`: `[out]` → `[m, out]`
    fn int8_matmul(x: FloatTensor<Self>, q: IntTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = scale.shape().dims::<1>()[0];
        // Computed in `x`'s precision (f32, or f16 under mixed precision).
        let dtype = FloatDType::from(x.dtype());
        let inp = x.shape().dims::<2>()[1];
        let w = widen::<Self>(Self::int8_codes(q, inp, out, false), dtype);
        let y = Self::float_matmul(x, w);
        let scale = Self::float_cast(scale, dtype);
        Self::float_mul(y, Self::float_reshape(scale, Shape::new([1, out])))
    }

    /// `dy · (q ⊙ scale)ᵀ`, computed as `(dy ⊙ scale) · qᵀ`.
    ///
    /// # Shapes
    /// - `dy`: `[m, out]`, `q`: `[in, out]` (stored as above), `scale`: `[out]` → `[m, inp]`
    fn int8_matmul_t(
        dy: FloatTensor<Self>,
        q: IntTensor<Self>,
        scale: FloatTensor<Self>,
        inp: usize,
    ) -> FloatTensor<Self> {
        let out = scale.shape().dims::<1>()[0];
        let dtype = FloatDType::from(dy.dtype());
        let scale = Self::float_cast(scale, dtype);
        let dy = Self::float_mul(dy, Self::float_reshape(scale, Shape::new([1, out])));
        let wt = widen::<Self>(Self::int8_codes(q, inp, out, true), dtype);
        Self::float_matmul(dy, wt)
    }

    /// `x · w` with `w` in f16.
    ///
    /// # Shapes
    /// - `x`: `[m, in]`, `w`: `[in, out]` (f16) → `[m, out]`
    fn f16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        f16_matmul_widened::<Self>(x, w)
    }

    /// `dy · wᵀ` with `w` in f16.
    ///
    /// # Shapes
    /// - `dy`: `[m, out]`, `w`: `[in, out]` (f16) → `[m, in]`
    fn f16_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        f16_matmul_t_widened::<Self>(dy, w)
    }
}

/// `x · w` through a temporary copy of the f16 `w` in `x`'s precision.
fn f16_matmul_widened<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    let dtype = FloatDType::from(x.dtype());
    B::float_matmul(x, B::float_cast(w, dtype))
}

/// `dy · wᵀ` through a temporary copy of the f16 `w` in `dy`'s precision.
fn f16_matmul_t_widened<B: Backend>(dy: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    let dtype = FloatDType::from(dy.dtype());
    let wt = B::float_cast(B::float_transpose(w), dtype);
    B::float_matmul(dy, wt)
}

/// `w` (f32, as [`FrozenOps::int8_codes`] gives it) in `dtype`, the input's precision.
fn widen<B: Backend>(w: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    if dtype == FloatDType::F32 {
        w
    } else {
        B::float_cast(w, dtype)
    }
}

impl FrozenOps for Flex {}

impl FrozenOps for Cube {
    fn int8_codes(q: IntTensor<Self>, inp: usize, out: usize, transposed: bool) -> FloatTensor<Self> {
        words_to_codes::<Self>(q, inp, out, transposed)
    }

    fn int8_matmul(x: FloatTensor<Self>, q: IntTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self> {
        super::route::int8_matmul(x, q, scale)
    }

    fn int8_matmul_t(
        dy: FloatTensor<Self>,
        q: IntTensor<Self>,
        scale: FloatTensor<Self>,
        inp: usize,
    ) -> FloatTensor<Self> {
        super::route::int8_matmul_t(dy, q, scale, inp)
    }

    fn f16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        if super::wgsl::f16_readable(&w) {
            super::route::f16_matmul(x, w)
        } else {
            f16_matmul_widened::<Self>(x, w)
        }
    }

    fn f16_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        if super::wgsl::f16_readable(&w) {
            super::route::f16_matmul_t(dy, w)
        } else {
            f16_matmul_t_widened::<Self>(dy, w)
        }
    }
}

/// Packed codes (`[out, ⌈in/4⌉]` i32 words, see [`FrozenOps`]) as f32 `[in, out]`, or `[out, in]` when `transposed`.
fn words_to_codes<B: Backend>(q: IntTensor<B>, inp: usize, out: usize, transposed: bool) -> FloatTensor<B> {
    let words = q.shape().dims::<2>()[1];
    // Byte j of each word, sign-extended: shift it to the top, then arithmetic-shift it back down.
    let bytes: Vec<FloatTensor<B>> = (0..4)
        .map(|j| {
            let top = B::bitwise_left_shift_scalar(q.clone(), (24 - 8 * j).into());
            let b = B::bitwise_right_shift_scalar(top, 24i32.into());
            B::float_reshape(B::int_into_float(b, FloatDType::F32), Shape::new([out, words, 1]))
        })
        .collect();
    let codes = B::float_reshape(B::float_cat(bytes, 2), Shape::new([out, words * 4]));
    let codes = if words * 4 == inp {
        codes
    } else {
        B::float_slice(codes, &[Slice::from(0..out), Slice::from(0..inp)])
    };
    if transposed {
        codes
    } else {
        B::float_transpose(codes)
    }
}

/// The quantized weight an op reads, kept by the autodiff graph for the backward pass (handles only).
#[derive(Debug, Clone)]
enum Frozen<B: Backend> {
    /// Codes, scales and the input width.
    Int8(IntTensor<B>, FloatTensor<B>, usize),
    F16(FloatTensor<B>),
}

impl<B: Backend + FrozenOps> Frozen<B> {
    fn forward(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        match self.clone() {
            Frozen::Int8(q, s, _) => B::int8_matmul(x, q, s),
            Frozen::F16(w) => B::f16_matmul(x, w),
        }
    }

    fn backward(&self, dy: FloatTensor<B>) -> FloatTensor<B> {
        match self.clone() {
            Frozen::Int8(q, s, inp) => B::int8_matmul_t(dy, q, s, inp),
            Frozen::F16(w) => B::f16_matmul_t(dy, w),
        }
    }
}

/// Backward of `x · W` (or `x · Wᵀ` when `transposed`) for a frozen `W`: only `x` gets a gradient.
#[derive(Debug)]
struct FrozenBackward {
    transposed: bool,
}

impl<B: Backend + FrozenOps> Backward<B, 1> for FrozenBackward {
    type State = Frozen<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            let dx = if self.transposed {
                ops.state.forward(grad)
            } else {
                ops.state.backward(grad)
            };
            grads.register::<B>(node.id, dx);
        }
    }
}

/// Records `x · W` (or `x · Wᵀ`) on the tape, keeping only the frozen weight's handles.
fn record<B: Backend + FrozenOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: Frozen<B>,
    transposed: bool,
) -> FloatTensor<Autodiff<B, C>> {
    let apply = |w: &Frozen<B>, x| {
        if transposed {
            w.backward(x)
        } else {
            w.forward(x)
        }
    };
    let (x, guard) = x.into_parts();
    let op = FrozenBackward { transposed };
    match op.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = apply(&weight, x);
            prep.finish(weight, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(apply(&weight, x)),
    }
}

impl<B: Backend + FrozenOps, C: CheckpointStrategy> FrozenOps for Autodiff<B, C> {
    fn int8_codes(q: IntTensor<Self>, inp: usize, out: usize, transposed: bool) -> FloatTensor<Self> {
        // Frozen values: no gradient flows into the codes.
        <Self as AutodiffBackend>::from_inner(B::int8_codes(q, inp, out, transposed))
    }

    fn int8_matmul(x: FloatTensor<Self>, q: IntTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self> {
        let inp = x.shape().dims::<2>()[1];
        record::<B, C>(x, Frozen::Int8(q, scale.into_primitive(), inp), false)
    }

    fn int8_matmul_t(
        dy: FloatTensor<Self>,
        q: IntTensor<Self>,
        scale: FloatTensor<Self>,
        inp: usize,
    ) -> FloatTensor<Self> {
        record::<B, C>(dy, Frozen::Int8(q, scale.into_primitive(), inp), true)
    }

    fn f16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C>(x, Frozen::F16(w.into_primitive()), false)
    }

    fn f16_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C>(dy, Frozen::F16(w.into_primitive()), true)
    }
}
