// Tiled product through a frozen matrix W stored [n_w, k_w] row by row in u32 words, without widening W in memory.
// Two storage formats (F16):
//   int8: four codes to a word along each row (rows padded to whole words; the row stride counts words), one f32
//         scale per row;
//   f16:  two halves to a word, rows packed back to back (the stride counts elements), no scale.
// Two orientations (TRANSPOSED):
//   false: c[m, o] = scale[o] · Σ_i a[m, i] · W[o, i]    (int8 forward y = x · Wᵀ; f16 input gradient dy · Wᵀ)
//   true:  c[m, i] = Σ_o a[m, o] · W[o, i]               (int8 input gradient (dy ⊙ scale) · W; f16 forward x · W)
// Each 16×16 workgroup computes a 64×64 tile of c, 4×4 outputs per thread held in registers, stepping through the
// reduction in slices of 16 that it stages in workgroup memory (a as f32, W decoded from its packed words, each
// thread loading 4 of each). Shapes need not be multiples of anything.

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const TRANSPOSED: bool = {{ transposed }};
const F16: bool = {{ f16 }};

// Every binding is read_write: CubeCL may place several tensors in one wgpu buffer, and wgpu refuses a buffer
// bound both read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<u32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// rows of a (m), reduction length (k), columns of c (n), row stride of W (u32 words for int8, elements for f16).
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

var<workgroup> tile_a: array<f32, 1024>; // [BM][BK]
var<workgroup> tile_b: array<f32, 1024>; // [BK][BN]

// W[o, i] as f32: int8: byte (i mod 4) of word (o, i / 4), sign-extended; f16: half (e mod 2) of word e / 2, where
// e = o · stride + i.
fn code(o: u32, i: u32, stride: u32) -> f32 {
    if (F16) {
        let e = o * stride + i;
        let pair = unpack2x16float(q[e / 2u]);
        return select(pair.x, pair.y, (e & 1u) == 1u);
    }
    let word = bitcast<i32>(q[o * stride + i / 4u]);
    let shift = 24u - 8u * (i % 4u);
    return f32((word << shift) >> 24u);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>,
        @builtin(local_invocation_index) flat: u32) {
    let m = info[0];
    let k = info[1];
    let n = info[2];
    let stride = info[3];
    let row0 = group.y * BM;
    let col0 = group.x * BN;
    var acc: array<f32, 16>;
    let steps = (k + BK - 1u) / BK;
    for (var t = 0u; t < steps; t++) {
        let k0 = t * BK;
        for (var e = 0u; e < 4u; e++) {
            let idx = flat + 256u * e;
            // a: consecutive threads read consecutive k of one row.
            let r = idx / BK;
            let ka = idx % BK;
            var va = 0.0;
            if (row0 + r < m && k0 + ka < k) {
                va = a[(row0 + r) * k + k0 + ka];
            }
            tile_a[r * BK + ka] = va;
            // W: consecutive threads read consecutive codes of one stored row.
            var kb: u32;
            var cb: u32;
            if (TRANSPOSED) {
                kb = idx / BN;
                cb = idx % BN;
            } else {
                cb = idx / BK;
                kb = idx % BK;
            }
            var vb = 0.0;
            if (k0 + kb < k && col0 + cb < n) {
                if (TRANSPOSED) {
                    vb = code(k0 + kb, col0 + cb, stride);
                } else {
                    vb = code(col0 + cb, k0 + kb, stride);
                }
            }
            tile_b[kb * BN + cb] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var bv: array<f32, 4>;
            for (var j = 0u; j < 4u; j++) {
                bv[j] = tile_b[kk * BN + local.x + 16u * j];
            }
            for (var i = 0u; i < 4u; i++) {
                let av = tile_a[(local.y + 16u * i) * BK + kk];
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += av * bv[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + local.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + local.x + 16u * j;
            if (row < m && col < n) {
                if (TRANSPOSED || F16) {
                    c[row * n + col] = acc[i * 4u + j];
                } else {
                    c[row * n + col] = acc[i * 4u + j] * scale[col];
                }
            }
        }
    }
}
