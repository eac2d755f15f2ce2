use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};

use super::*;
use crate::testing::max_rel;

fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    crate::testing::uniform(rows * cols, seed)
}

fn vec2(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

#[test]
fn int8_codes_and_scales_follow_the_definition() {
    // Rows are output channels.
    let w = [0.5, -1.0, -2.0, 1.0, 0.0, 0.0];
    let m = quantize_int8(&w, 3, 2, ScaleDType::F32);
    assert_eq!(m.scale, vec![1.0 / 127.0, 2.0 / 127.0, 0.0]);
    assert_eq!(m.q, vec![64, -127, -127, 64, 0, 0]);
    let err = max_rel(&m.dequantize(), &w);
    assert!(err <= 0.5 * 2.0 / 127.0, "{err}");
}

#[test]
fn int8_f16_scales_are_representable() {
    let w = random(7, 5, 1);
    let m = quantize_int8(&w, 7, 5, ScaleDType::F16);
    for s in &m.scale {
        assert_eq!(half::f16::from_f32(*s).to_f32(), *s);
    }
}

/// Forward and input gradient of the int8 product against a dense matmul with the dequantized weight, on shapes that
/// are not multiples of any tile, batch 1 and a long reduction; plus dequantization for export.
fn check_int8(device: &Device, expected: DType) {
    // (rows, in, out): GEMV (≤ 4 rows) and tiled paths, odd widths (padded words), a long reduction both ways.
    for (m, k, n) in [(5, 37, 19), (1, 64, 48), (3, 4096, 12), (17, 4099, 10)] {
        check_int8_shape(device, expected, m, k, n);
    }
}

fn check_int8_shape(device: &Device, expected: DType, m: usize, k: usize, n: usize) {
    let w = random(n, k, 7);
    let q8 = quantize_int8(&w, n, k, ScaleDType::F32);
    // PyTorch layout [out, in]; the product wants [in, out].
    let dense = Tensor::<2>::from_data(TensorData::new(q8.dequantize(), [n, k]), device).transpose();
    let (q, scale) = q8.to_tensors(device);
    assert_eq!(q.dtype(), expected);
    let back = vec2(int8_dequantize(q.clone(), scale.clone(), k));
    assert!(
        max_rel(&back, &vec2(dense.clone())) < 1e-6,
        "dequantized codes ({m}, {k}, {n})"
    );
    // An embedding lookup through the codes: output channels in any order, repeated.
    let picked: Vec<i64> = [n - 1, 0, n / 2, n - 1].iter().map(|&i| i as i64).collect();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(picked.clone(), [4]), device);
    let rows = vec2(int8_channels(q.clone(), scale.clone(), k, ids.clone()));
    let want = vec2(dense.clone().transpose().select(0, ids));
    assert!(max_rel(&rows, &want) < 1e-6, "channels {picked:?} ({m}, {k}, {n})");
    let x_data = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), device).into_data();
    let upstream = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), device);

    let ad = device.clone().autodiff();
    let x = Tensor::<2>::from_data(x_data.clone(), &ad).require_grad();
    let y = int8_matmul(x.clone(), q.to_device(&ad), scale.to_device(&ad));
    let grads = y.clone().mul(upstream.clone().to_device(&ad)).sum().backward();
    let dx = x.grad(&grads).unwrap();

    let xr = Tensor::<2>::from_data(x_data, &ad).require_grad();
    let yr = xr.clone().matmul(dense.to_device(&ad));
    let grads_r = yr.clone().mul(upstream.to_device(&ad)).sum().backward();
    let dxr = xr.grad(&grads_r).unwrap();

    let tol = 1e-5 * (k as f32 / 64.0).max(1.0);
    assert!(max_rel(&vec2(y), &vec2(yr)) < tol, "forward ({m}, {k}, {n})");
    assert!(max_rel(&vec2(dx), &vec2(dxr)) < tol, "input gradient ({m}, {k}, {n})");
}

#[test]
fn int8_matches_dequantized_dense_on_cpu() {
    check_int8(&Device::flex(), DType::I8);
}

/// On wgpu (CI: Mesa's lavapipe) the codes travel as i32 words, four to a word.
#[test]
fn int8_matches_dequantized_dense_on_wgpu() {
    let Some(gpu) = crate::device::gpu_for_tests("int8_matches_dequantized_dense_on_wgpu") else {
        return;
    };
    check_int8(&gpu, DType::I32);
}

/// Forward and input gradient of the f16 product against a dense matmul with the widened weight: the GEMV (≤ 4 rows)
/// and tiled kernels on wgpu, shapes off every tile, a long reduction, and an odd element count (widened instead).
fn check_f16(device: &Device) {
    for (m, k, n) in [
        (5, 37, 18),
        (1, 64, 48),
        (3, 4096, 12),
        (17, 4099, 10),
        (2, 33, 17),
        (9, 33, 17),
    ] {
        let w = Tensor::<2>::from_data(TensorData::new(random(k, n, 3), [k, n]), device)
            .cast(burn::tensor::FloatDType::F16);
        let wide = w.clone().cast(burn::tensor::FloatDType::F32);
        let ad = device.clone().autodiff();
        let x0 = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), device).into_data();
        let upstream = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), device);
        let x = Tensor::<2>::from_data(x0.clone(), &ad).require_grad();
        let y = f16_matmul(x.clone(), w.to_device(&ad));
        let dx = x
            .grad(&y.clone().mul(upstream.clone().to_device(&ad)).sum().backward())
            .unwrap();
        let xr = Tensor::<2>::from_data(x0, &ad).require_grad();
        let yr = xr.clone().matmul(wide.to_device(&ad));
        let dxr = xr
            .grad(&yr.clone().mul(upstream.to_device(&ad)).sum().backward())
            .unwrap();
        let tol = 1e-5 * (k as f32 / 64.0).max(1.0);
        assert!(max_rel(&vec2(y), &vec2(yr)) < tol, "forward ({m}, {k}, {n})");
        assert!(max_rel(&vec2(dx), &vec2(dxr)) < tol, "input gradient ({m}, {k}, {n})");
    }
}

#[test]
fn f16_matches_dense_and_has_input_gradient_on_cpu() {
    check_f16(&Device::flex());
}

#[test]
fn f16_matches_dense_and_has_input_gradient_on_wgpu() {
    let Some(gpu) = crate::device::gpu_for_tests("f16_matches_dense_and_has_input_gradient_on_wgpu") else {
        return;
    };
    check_f16(&gpu);
}
