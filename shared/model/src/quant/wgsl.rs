//! Our WGSL kernels for products through frozen int8 and f16 weights on wgpu (`shaders/`), launched through burn's
//! CubeCL backend as hand-written source kernels. The products read the weight packed in GPU memory (four int8 codes
//! or two halves per u32 word) without widening it; [`int8_widen`] makes the transient dense copy of the dense route
//! (`route.rs`). All of them compute in f32.

use burn::backend::{Backend, Cube};
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim, KernelId};
use burn_cubecl::cubecl::server::KernelArguments;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::template::{KernelSource, SourceKernel, SourceTemplate};
use burn_cubecl::tensor::CubeTensor;

/// Rows of x up to which the GEMV kernel (one workgroup per output) beats the tiled one.
pub(crate) const GEMV_MAX_ROWS: usize = 4;
/// Outputs per dispatch row of the GEMV kernel (its `SPAN`).
const GEMV_SPAN: usize = 32768;
/// The tiled kernel's output tile edge (16×16 threads, 4×4 outputs each).
const TILE: usize = 64;
/// Workgroups per dispatch dimension that every wgpu device accepts.
const DISPATCH_MAX: usize = 65535;

/// Which kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// int8 `y = x · Wᵀ` for a few rows (decode).
    Gemv,
    /// int8 `y = x · Wᵀ`, tiled.
    Gemm,
    /// int8 `dx = a · W` (a = dy ⊙ scale), tiled.
    GemmT,
    /// f16 `y = x · W` (W `[in, out]`) for a few rows, the reduction split in slices.
    F16Gemv,
    /// f16 `y = x · W`, tiled.
    F16Gemm,
    /// f16 `dx = dy · Wᵀ`, tiled.
    F16GemmT,
    /// int8 codes times their scales, widened to a dense f32 matrix.
    Widen,
}

impl KernelSource for Kernel {
    fn source(&self) -> SourceTemplate {
        // The tiled kernel's orientation is that of the stored matrix: int8 is stored [out, in], f16 [in, out].
        let gemm = |transposed: bool, f16: bool| {
            SourceTemplate::new(include_str!("../../../../shaders/frozen_gemm.wgsl"))
                .register("transposed", transposed.to_string())
                .register("f16", f16.to_string())
        };
        match self {
            Kernel::Gemv => SourceTemplate::new(include_str!("../../../../shaders/int8_gemv.wgsl")),
            Kernel::F16Gemv => SourceTemplate::new(include_str!("../../../../shaders/f16_gemv.wgsl")),
            Kernel::Gemm => gemm(false, false),
            Kernel::GemmT => gemm(true, false),
            Kernel::F16Gemm => gemm(true, true),
            Kernel::F16GemmT => gemm(false, true),
            Kernel::Widen => SourceTemplate::new(include_str!("../../../../shaders/int8_dequantize.wgsl")),
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(*self)
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// An empty contiguous `[rows, cols]` f32 tensor on `like`'s device.
fn empty(like: &CubeTensor, rows: usize, cols: usize) -> CubeTensor {
    let client = like.client.clone();
    CubeTensor::new_contiguous(
        client.clone(),
        like.device.clone(),
        Shape::new([rows, cols]),
        client.empty(rows * cols * std::mem::size_of::<f32>()),
        DType::F32,
    )
}

/// Runs a tiled or int8 GEMV `kernel` on `a` (`[m, k]` f32) and the packed weight `w` (`[rows, stride]`: int8 words
/// or f16 elements), giving `[m, n]` f32. `scale` is `None` for f16.
fn launch(kernel: Kernel, a: CubeTensor, w: CubeTensor, scale: Option<CubeTensor>, n: usize) -> CubeTensor {
    let (a, w) = (into_contiguous(a), into_contiguous(w));
    let (m, k) = (a.meta.shape()[0], a.meta.shape()[1]);
    let stride = w.meta.shape()[1];
    let client = a.client.clone();
    let out = empty(&a, m, n);
    let info: [u32; 4] = [m as u32, k as u32, n as u32, stride as u32];
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let scale = match scale {
        Some(s) => into_contiguous(s).handle.binding(),
        // f16 kernels never read it, but the binding must exist.
        None => client.create_from_slice(bytemuck::cast_slice(&[1.0f32])).binding(),
    };
    let (cube_dim, count) = match kernel {
        Kernel::Gemv => (
            CubeDim::new_1d(64),
            CubeCount::Static(n.min(GEMV_SPAN) as u32, m as u32, n.div_ceil(GEMV_SPAN) as u32),
        ),
        _ => (
            CubeDim::new_2d(16, 16),
            CubeCount::Static(n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
        ),
    };
    let args = KernelArguments::new().with_buffers(vec![
        a.handle.clone().binding(),
        w.handle.clone().binding(),
        scale,
        out.handle.clone().binding(),
        info.binding(),
    ]);
    client.launch(Box::new(SourceKernel::new(kernel, cube_dim)), count, args);
    out
}

/// `a · (q ⊙ scale)ᵀ` (`a` f32) with `q` packed `[n, ⌈k/4⌉]`; the GEMV kernel for a few rows, the tiled one
/// otherwise.
///
/// # Shapes
/// - `a`: `[m, k]` → `[m, n]`
pub(crate) fn int8_product(a: CubeTensor, q: CubeTensor, scale: CubeTensor) -> CubeTensor {
    let (m, n) = (a.meta.shape()[0], scale.meta.shape()[0]);
    let kernel = if m <= GEMV_MAX_ROWS { Kernel::Gemv } else { Kernel::Gemm };
    launch(kernel, a, q, Some(scale), n)
}

/// `a · q` (`a` f32, already scaled by the weight's scales) with `q` packed `[k, ⌈n/4⌉]`: the input gradient of
/// [`int8_product`].
///
/// # Shapes
/// - `a`: `[m, k]` → `[m, n]`
pub(crate) fn int8_product_t(a: CubeTensor, q: CubeTensor, scale: CubeTensor, n: usize) -> CubeTensor {
    launch(Kernel::GemmT, a, q, Some(scale), n)
}

/// `q ⊙ scale` widened into a dense row-major f32 matrix, `q` packed `[n, ⌈k/4⌉]`.
///
/// # Shapes
/// - `q`: `[n, ⌈k/4⌉]`, `scale`: `[n]` → `[n, k]`
pub(crate) fn int8_widen(q: CubeTensor, scale: CubeTensor, k: usize) -> CubeTensor {
    let (q, scale) = (into_contiguous(q), into_contiguous(scale));
    let (n, words) = (q.meta.shape()[0], q.meta.shape()[1]);
    let client = q.client.clone();
    let out = empty(&q, n, k);
    let groups = (n * words).div_ceil(256);
    let across = groups.min(DISPATCH_MAX);
    let info: [u32; 4] = [n as u32, k as u32, words as u32, across as u32];
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let args = KernelArguments::new().with_buffers(vec![
        q.handle.clone().binding(),
        scale.handle.clone().binding(),
        out.handle.clone().binding(),
        info.binding(),
    ]);
    let count = CubeCount::Static(across as u32, groups.div_ceil(across) as u32, 1);
    client.launch(
        Box::new(SourceKernel::new(Kernel::Widen, CubeDim::new_1d(256))),
        count,
        args,
    );
    out
}

/// Whether our f16 kernels can read `w` (`[in, out]` f16): they bind it as u32 words, so it must fill whole words.
pub(crate) fn f16_readable(w: &CubeTensor) -> bool {
    w.dtype == DType::F16 && w.meta.shape().num_elements().is_multiple_of(2)
}

/// `a · w` (`a` f32) with `w` f16 `[k, n]` (see [`f16_readable`]); the split GEMV for a few rows, the tiled kernel
/// otherwise.
///
/// # Shapes
/// - `a`: `[m, k]` → `[m, n]`
pub(crate) fn f16_product(a: CubeTensor, w: CubeTensor) -> CubeTensor {
    let (m, k, n) = (a.meta.shape()[0], a.meta.shape()[1], w.meta.shape()[1]);
    if m <= GEMV_MAX_ROWS {
        f16_gemv(a, w, m, k, n)
    } else {
        launch(Kernel::F16Gemm, a, w, None, n)
    }
}

/// `a · wᵀ` (`a` f32) with `w` f16 `[n, k]`: the input gradient of [`f16_product`].
///
/// # Shapes
/// - `a`: `[m, k]` → `[m, n]`
pub(crate) fn f16_product_t(a: CubeTensor, w: CubeTensor) -> CubeTensor {
    let n = w.meta.shape()[0];
    launch(Kernel::F16GemmT, a, w, None, n)
}

/// The f16 GEMV: partial sums per reduction slice, then their sum.
fn f16_gemv(x: CubeTensor, w: CubeTensor, m: usize, k: usize, n: usize) -> CubeTensor {
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    // Slices of at least 128 inputs, at most 64 of them: enough workgroups for a narrow layer to fill a GPU.
    let splits = (k / 128).clamp(1, 64);
    let slice = k.div_ceil(splits);
    let client = x.client.clone();
    let part = empty(&x, splits * m, n);
    let info: [u32; 4] = [m as u32, k as u32, n as u32, slice as u32];
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let args = KernelArguments::new().with_buffers(vec![
        x.handle.clone().binding(),
        w.handle.clone().binding(),
        part.handle.clone().binding(),
        info.binding(),
    ]);
    let count = CubeCount::Static(n.div_ceil(64) as u32, splits as u32, 1);
    client.launch(
        Box::new(SourceKernel::new(Kernel::F16Gemv, CubeDim::new_1d(64))),
        count,
        args,
    );
    sum_slices::<Cube>(part, splits, m, n)
}

/// `[splits · m, n]` partial sums added over the slices: `[m, n]`.
fn sum_slices<B: Backend>(part: B::FloatTensorPrimitive, splits: usize, m: usize, n: usize) -> B::FloatTensorPrimitive {
    let part = B::float_reshape(part, Shape::new([splits, m * n]));
    B::float_reshape(B::float_sum_dim(part, 0), Shape::new([m, n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates WGSL the way wgpu will (naga, every capability the kernels may need).
    fn validate(name: &str, source: &str) {
        let module =
            naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    }

    #[test]
    fn every_kernel_variant_is_valid_wgsl() {
        for kernel in [
            Kernel::Gemv,
            Kernel::Gemm,
            Kernel::GemmT,
            Kernel::F16Gemv,
            Kernel::F16Gemm,
            Kernel::F16GemmT,
            Kernel::Widen,
        ] {
            validate(&format!("{kernel:?}"), &kernel.source().complete());
        }
    }

    #[test]
    fn every_file_in_shaders_is_valid_wgsl() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "wgsl") {
                // Template placeholders take a value they can have.
                let source = std::fs::read_to_string(&path)
                    .unwrap()
                    .replace("{{ transposed }}", "false")
                    .replace("{{ f16 }}", "false");
                validate(&path.display().to_string(), &source);
                seen += 1;
            }
        }
        assert!(seen >= 4, "no WGSL files found in {}", dir.display());
    }
}
