// y = x · W for a few rows of x (decode), W f16 stored [k, n] (the runtime's [in, out] layout), two halves to a u32
// word, rows back to back. One thread per output column and rows of x: each thread walks its column down a slice of
// the reduction, so the threads of a workgroup read consecutive halves of one row of W (coalesced) and every half of
// W is read once for all rows of x. The reduction is split in SPLITS slices (more workgroups for a GPU to fill its
// cores); each writes its partial sums to part[s, r, o], which the host then adds up.

const THREADS: u32 = 64u;
// Rows of x handled at once (the host uses this kernel for at most this many).
const MAX_ROWS: u32 = 4u;

// Every binding is read_write: CubeCL may place several tensors in one wgpu buffer, and wgpu refuses a buffer
// bound both read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<u32>;
@group(0) @binding(2) var<storage, read_write> part: array<f32>;
// rows of x (m), reduction length (k), outputs (n), reduction slice length.
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
    let m = info[0];
    let k = info[1];
    let n = info[2];
    let slice = info[3];
    let o = group.x * THREADS + local.x;
    let s = group.y;
    if (o >= n) {
        return;
    }
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    let end = min(k, (s + 1u) * slice);
    for (var i = s * slice; i < end; i++) {
        let e = i * n + o;
        let pair = unpack2x16float(w[e / 2u]);
        let v = select(pair.x, pair.y, (e & 1u) == 1u);
        for (var r = 0u; r < MAX_ROWS; r++) {
            if (r < m) {
                acc[r] += x[r * k + i] * v;
            }
        }
    }
    for (var r = 0u; r < m; r++) {
        part[(s * m + r) * n + o] = acc[r];
    }
}
