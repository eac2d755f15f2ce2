// w[o, i] = scale[o] · code(o, i): packed int8 codes ([n, words], four to a u32 word along each row, rows padded
// with zero codes) widened into a dense row-major f32 [n, k] matrix, one thread per word. This feeds the dense
// route of a product (`shared/src/quant/route.rs`): a transient copy that lives for one matmul.

const THREADS: u32 = 256u;

// Every binding is read_write: CubeCL may place several tensors in one wgpu buffer, and wgpu refuses a buffer
// bound both read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> q: array<u32>;
@group(0) @binding(1) var<storage, read_write> scale: array<f32>;
@group(0) @binding(2) var<storage, read_write> w: array<f32>;
// rows (n), columns (k), u32 words per row, workgroups per dispatch row (the rest continue along y).
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let n = info[0];
    let k = info[1];
    let words = info[2];
    let across = info[3];
    let idx = (group.y * across + group.x) * THREADS + local;
    if (idx >= n * words) {
        return;
    }
    let o = idx / words;
    let i0 = (idx % words) * 4u;
    let word = bitcast<i32>(q[idx]);
    let s = scale[o];
    for (var j = 0u; j < 4u; j++) {
        if (i0 + j < k) {
            w[o * k + i0 + j] = f32((word << (24u - 8u * j)) >> 24u) * s;
        }
    }
}
