// y = x · Wᵀ for a few rows of x (decode): W is int8 ([n, k] codes, four to a u32 word along each row, one f32
// scale per row). One workgroup of 64 threads per output element: the threads stride over the row's words (each
// read once, four codes at a time, against a vec4 of x), then reduce in workgroup memory. Memory-bound by design:
// W's bytes are read exactly once per row of x.

const THREADS: u32 = 64u;
// Workgroups per dispatch row: outputs beyond it continue in the z dimension.
const SPAN: u32 = 32768u;

// Every binding is read_write: CubeCL may place several tensors in one wgpu buffer, and wgpu refuses a buffer
// bound both read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<u32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
// rows of x (m), reduction length (k), outputs (n), u32 words per row of W.
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

var<workgroup> partial: array<f32, 64>;

fn lane(word: i32, j: u32) -> f32 {
    return f32((word << (24u - 8u * j)) >> 24u);
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
    let k = info[1];
    let n = info[2];
    let words = info[3];
    let o = group.z * SPAN + group.x;
    let r = group.y;
    var acc = 0.0;
    if (o < n) {
        let base = r * k;
        for (var w = local.x; w < words; w += THREADS) {
            let word = bitcast<i32>(q[o * words + w]);
            let i = 4u * w;
            if (i + 3u < k) {
                let xv = vec4<f32>(x[base + i], x[base + i + 1u], x[base + i + 2u], x[base + i + 3u]);
                let wv = vec4<f32>(lane(word, 0u), lane(word, 1u), lane(word, 2u), lane(word, 3u));
                acc += dot(xv, wv);
            } else {
                for (var j = 0u; i + j < k; j++) {
                    acc += x[base + i + j] * lane(word, j);
                }
            }
        }
    }
    partial[local.x] = acc;
    workgroupBarrier();
    for (var stride = THREADS / 2u; stride > 0u; stride = stride / 2u) {
        if (local.x < stride) {
            partial[local.x] += partial[local.x + stride];
        }
        workgroupBarrier();
    }
    if (local.x == 0u && o < n) {
        y[r * n + o] = partial[0] * scale[o];
    }
}
