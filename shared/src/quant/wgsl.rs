//! Our WGSL kernels for products through frozen int8 weights on wgpu (`shaders/`), launched through burn's CubeCL
//! backend as hand-written source kernels. The weight stays packed (four codes per u32 word) in GPU memory; no
//! widened copy of it is made.

use burn::backend::{Backend, Cube};
use burn::tensor::{DType, FloatDType, Shape};
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

/// Which kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Int8Kernel {
    /// `y = x · Wᵀ` for a few rows (decode).
    Gemv,
    /// `y = x · Wᵀ`, tiled.
    Gemm,
    /// `dx = a · W` (a = dy ⊙ scale), tiled.
    GemmT,
}

impl KernelSource for Int8Kernel {
    fn source(&self) -> SourceTemplate {
        match self {
            Int8Kernel::Gemv => SourceTemplate::new(include_str!("../../../shaders/int8_gemv.wgsl")),
            Int8Kernel::Gemm | Int8Kernel::GemmT => {
                SourceTemplate::new(include_str!("../../../shaders/int8_gemm.wgsl"))
                    .register("transposed", if *self == Int8Kernel::GemmT { "true" } else { "false" })
            }
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(*self)
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// `t` in `dtype` (our kernels compute in f32; mixed precision casts around them).
fn cast<B: Backend>(t: B::FloatTensorPrimitive, dtype: DType) -> B::FloatTensorPrimitive {
    B::float_cast(t, FloatDType::from(dtype))
}

/// `dy ⊙ scale` with one scale per column, in f32.
fn scale_columns<B: Backend>(dy: B::FloatTensorPrimitive, scale: B::FloatTensorPrimitive, out: usize) -> B::FloatTensorPrimitive {
    B::float_mul(cast::<B>(dy, DType::F32), B::float_reshape(scale, Shape::new([1, out])))
}

/// Runs `kernel` on `a` (`[m, k]` f32) and the packed weight, giving `[m, n]` f32.
fn launch(kernel: Int8Kernel, a: CubeTensor, q: CubeTensor, scale: CubeTensor, n: usize) -> CubeTensor {
    let (a, q, scale) = (into_contiguous(a), into_contiguous(q), into_contiguous(scale));
    let (m, k) = (a.meta.shape()[0], a.meta.shape()[1]);
    let words = q.meta.shape()[1];
    let client = a.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        a.device.clone(),
        Shape::new([m, n]),
        client.empty(m * n * std::mem::size_of::<f32>()),
        DType::F32,
    );
    let info: [u32; 4] = [m as u32, k as u32, n as u32, words as u32];
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let (cube_dim, count) = match kernel {
        Int8Kernel::Gemv => (
            CubeDim::new_1d(64),
            CubeCount::Static(n.min(GEMV_SPAN) as u32, m as u32, n.div_ceil(GEMV_SPAN) as u32),
        ),
        Int8Kernel::Gemm | Int8Kernel::GemmT => (
            CubeDim::new_2d(16, 16),
            CubeCount::Static(n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
        ),
    };
    let args = KernelArguments::new().with_buffers(vec![
        a.handle.clone().binding(),
        q.handle.clone().binding(),
        scale.handle.clone().binding(),
        out.handle.clone().binding(),
        info.binding(),
    ]);
    client.launch(Box::new(SourceKernel::new(kernel, cube_dim)), count, args);
    out
}

/// `x · (q ⊙ scale)ᵀ` with `q` packed `[out, ⌈in/4⌉]`; the GEMV kernel for a few rows, the tiled one otherwise.
///
/// # Shapes
/// - `x`: `[m, in]` → `[m, out]`
pub(crate) fn int8_matmul(x: CubeTensor, q: CubeTensor, scale: CubeTensor) -> CubeTensor {
    let dtype = x.dtype;
    let x = cast::<Cube>(x, DType::F32);
    let (m, out) = (x.meta.shape()[0], scale.meta.shape()[0]);
    let kernel = if m <= GEMV_MAX_ROWS { Int8Kernel::Gemv } else { Int8Kernel::Gemm };
    let y = launch(kernel, x, q, scale, out);
    cast::<Cube>(y, dtype)
}

/// `(dy ⊙ scale) · q` with `q` packed `[out, ⌈in/4⌉]`: the input gradient of [`int8_matmul`].
///
/// # Shapes
/// - `dy`: `[m, out]` → `[m, inp]`
pub(crate) fn int8_matmul_t(dy: CubeTensor, q: CubeTensor, scale: CubeTensor, inp: usize) -> CubeTensor {
    let dtype = dy.dtype;
    let out = scale.meta.shape()[0];
    let scaled = scale_columns::<Cube>(dy, scale.clone(), out);
    let dx = launch(Int8Kernel::GemmT, scaled, q, scale, inp);
    cast::<Cube>(dx, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates WGSL the way wgpu will (naga, every capability the kernels may need).
    fn validate(name: &str, source: &str) {
        let module = naga::front::wgsl::parse_str(source)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    }

    #[test]
    fn every_kernel_variant_is_valid_wgsl() {
        for kernel in [Int8Kernel::Gemv, Int8Kernel::Gemm, Int8Kernel::GemmT] {
            validate(&format!("{kernel:?}"), &kernel.source().complete());
        }
    }

    #[test]
    fn every_file_in_shaders_is_valid_wgsl() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "wgsl") {
                // Template placeholders take a value they can have.
                let source = std::fs::read_to_string(&path).unwrap().replace("{{ transposed }}", "false");
                validate(&path.display().to_string(), &source);
                seen += 1;
            }
        }
        assert!(seen >= 2, "no WGSL files found in {}", dir.display());
    }
}
