"""Regenerates quant_blocks.safetensors: random ggml blocks and their values as decoded by the `gguf` Python package
(llama.cpp's gguf-py, an implementation independent of ours). Run: pip install gguf numpy safetensors; python3 this."""
import numpy as np
from gguf import GGMLQuantizationType as T, quants
from safetensors.numpy import save_file

rng = np.random.default_rng(1234)
# (type, bytes per block, byte offsets of f16 scale fields that must be finite)
types = {
    "Q4_0": (T.Q4_0, 18, [0]),
    "Q4_1": (T.Q4_1, 20, [0, 2]),
    "Q5_0": (T.Q5_0, 22, [0]),
    "Q5_1": (T.Q5_1, 24, [0, 2]),
    "Q8_0": (T.Q8_0, 34, [0]),
    "Q4_K": (T.Q4_K, 144, [0, 2]),
    "Q5_K": (T.Q5_K, 176, [0, 2]),
    "Q6_K": (T.Q6_K, 210, [208]),
}
out = {}
for name, (ty, size, scale_offsets) in types.items():
    blocks = 3
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    for off in scale_offsets:
        scales = rng.uniform(-0.05, 0.05, size=blocks).astype(np.float16).view(np.uint8).reshape(blocks, 2)
        raw[:, off:off + 2] = scales
    values = quants.dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
    out[f"bytes.{name}"] = raw.reshape(-1)
    out[f"values.{name}"] = values
save_file(out, "quant_blocks.safetensors")
