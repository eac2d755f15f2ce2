//! GGUF reader unit tests: block formats against gguf-py, llama.cpp's Q/K row order, absurd counts.
//! Whole-file tests (names, config, tokenizer, truncation, corruption) are in `tests/gguf_files.rs`.

use super::quant::{dequantize, GgmlType};
use super::*;

fn open_bytes(bytes: &[u8]) -> Result<GgufSource, LoadError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufSource::open(&path)
}

#[test]
fn block_formats_match_gguf_py() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/quant_blocks.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, ty) in [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("Q5_K", GgmlType::Q5K),
        ("Q6_K", GgmlType::Q6K),
    ] {
        let raw = st.tensor(&format!("bytes.{name}")).unwrap();
        let expected = crate::load::reader::f32s(st.tensor(&format!("values.{name}")).unwrap().data());
        let got = dequantize(ty, raw.data(), expected.len()).unwrap();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{name}[{i}]: {g} vs {e}");
        }
        // One byte short is an error, not a panic.
        assert!(dequantize(ty, &raw.data()[1..], expected.len()).is_err());
    }
}

#[test]
fn unpermute_undoes_llama_cpp_row_order() {
    // One head of width 4: llama.cpp stores Hugging Face rows in the order 0, 2, 1, 3 (interleaved halves).
    // (`tests/gguf_files.rs` checks the full conversion of a real model against reference logits.)
    let gguf = [0.0, 2.0, 1.0, 3.0];
    assert_eq!(unpermute_rows(&gguf, &[4, 1], 1).unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
    // Two heads of width 2 are their own order.
    assert_eq!(unpermute_rows(&gguf, &[4, 1], 2).unwrap(), gguf.to_vec());
    assert!(unpermute_rows(&gguf, &[4, 1], 3).is_err());
    assert!(
        unpermute_rows(&gguf, &[4, 2], 2).is_err(),
        "4 values cannot fill 4 rows of 2"
    );
    // Zero-width rows, as a fuzzed file declared them (the walk over 2^29 rows took 40 s): nothing to move.
    assert_eq!(unpermute_rows(&[], &[1 << 29, 0], 2).unwrap(), Vec::<f32>::new());
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let err = open_bytes(&b).err().unwrap().to_string();
    assert!(err.contains("tensor count"), "{err}");
}
