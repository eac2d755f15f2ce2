// Tiled product through a frozen int8 matrix W ([n_w, k_w] codes, four to a u32 word along each row, one f32 scale
// per row), without widening W in memory:
//   forward  (TRANSPOSED = false): c[m, o] = scale[o] · Σ_i a[m, i] · W[o, i]        (y = x · Wᵀ)
//   backward (TRANSPOSED = true):  c[m, i] = Σ_o a[m, o] · W[o, i]                   (dx = (dy ⊙ scale) · W)
// Each 16×16 workgroup computes a 16×16 tile of c, stepping through the reduction in tiles of 16 that it stages in
// workgroup memory (a from f32, W decoded from its packed bytes). Shapes need not be multiples of 16.

const TILE: u32 = 16u;
const TRANSPOSED: bool = {{ transposed }};

// Every binding is read_write: CubeCL may place several tensors in one wgpu buffer, and wgpu refuses a buffer
// bound both read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<u32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// rows of a (m), reduction length (k), columns of c (n), u32 words per row of W.
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

var<workgroup> tile_a: array<f32, 256>;
var<workgroup> tile_b: array<f32, 256>;

// W[o, i] as f32: byte (i mod 4) of word (o, i / 4), sign-extended.
fn code(o: u32, i: u32, words: u32) -> f32 {
    let word = bitcast<i32>(q[o * words + i / 4u]);
    let shift = 24u - 8u * (i % 4u);
    return f32((word << shift) >> 24u);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
    let m = info[0];
    let k = info[1];
    let n = info[2];
    let words = info[3];
    let row = group.y * TILE + local.y;
    let col = group.x * TILE + local.x;
    var acc = 0.0;
    let steps = (k + TILE - 1u) / TILE;
    for (var t = 0u; t < steps; t++) {
        let ka = t * TILE + local.x;
        var va = 0.0;
        if (row < m && ka < k) {
            va = a[row * k + ka];
        }
        tile_a[local.y * TILE + local.x] = va;
        let kb = t * TILE + local.y;
        var vb = 0.0;
        if (kb < k && col < n) {
            if (TRANSPOSED) {
                vb = code(kb, col, words);
            } else {
                vb = code(col, kb, words);
            }
        }
        tile_b[local.y * TILE + local.x] = vb;
        workgroupBarrier();
        for (var j = 0u; j < TILE; j++) {
            acc += tile_a[local.y * TILE + j] * tile_b[j * TILE + local.x];
        }
        workgroupBarrier();
    }
    if (row < m && col < n) {
        if (TRANSPOSED) {
            c[row * n + col] = acc;
        } else {
            c[row * n + col] = acc * scale[col];
        }
    }
}
