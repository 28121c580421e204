// Flash attention backward, part 2: dK and dV. One invocation per key row; Q, dO and the per-row
// statistics stream through workgroup memory. Splitting dQ from dK/dV costs a second recomputation
// of the scores but needs no atomics, which WGSL does not have for floats.
//   dV_j = sum_i P_ij dO_i,   dK_j = scale * sum_i dS_ij Q_i.

@group(0) @binding(5) var<storage, read_write> dout: array<f32>;
// [L | D], each B*H*N.
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
// [dK | dV], each B*H*N*DH.
@group(0) @binding(7) var<storage, read_write> dkv: array<f32>;

var<workgroup> q_tile: array<f32, BC * DH>;
var<workgroup> do_tile: array<f32, BC * DH>;
var<workgroup> lse_tile: array<f32, BC>;
var<workgroup> d_tile: array<f32, BC>;

@compute @workgroup_size(BR)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n = seq_len();
    let bh = wg.y;
    let b = batch_of(bh);
    let col0 = wg.x * BR;
    let j = col0 + lane;
    let in_range = j < n;
    let head = bh * n * DH;
    let scale = softmax_scale();

    // A padding key is seen by no query: its gradients are zero, but they are still written.
    var attended = false;
    var kj: array<f32, DH>;
    var vj: array<f32, DH>;
    var dk: array<f32, DH>;
    var dv: array<f32, DH>;
    if (in_range) {
        attended = key_open(b, j);
        for (var d = 0u; d < DH; d++) {
            kj[d] = k[head + j * DH + d];
            vj[d] = v[head + j * DH + d];
        }
    }

    let bounds = uniform_bounds(lane, query_start(col0), n);
    for (var t0 = bounds.x; t0 < bounds.y; t0 += BC) {
        let cnt = min(BC, bounds.y - t0);
        for (var e = lane; e < BC * DH; e += BR) {
            let r = e / DH;
            var qv = 0.0;
            var dov = 0.0;
            if (r < cnt) {
                let src = head + (t0 + r) * DH + e % DH;
                qv = q[src] * scale;
                dov = dout[src];
            }
            q_tile[e] = qv;
            do_tile[e] = dov;
        }
        for (var r = lane; r < BC; r += BR) {
            var row_lse = 0.0;
            var row_d = 0.0;
            if (r < cnt) {
                row_lse = stats[bh * n + t0 + r];
                row_d = stats[half_offset() + bh * n + t0 + r];
            }
            lse_tile[r] = row_lse;
            d_tile[r] = row_d;
        }
        workgroupBarrier();

        if (attended) {
            for (var r = 0u; r < cnt; r++) {
                if (allowed(t0 + r, j)) {
                    var score = 0.0;
                    var dp = 0.0;
                    for (var d = 0u; d < DH; d++) {
                        score += q_tile[r * DH + d] * kj[d];
                        dp += do_tile[r * DH + d] * vj[d];
                    }
                    let p = exp(score - lse_tile[r]);
                    let ds = p * (dp - d_tile[r]);
                    for (var d = 0u; d < DH; d++) {
                        dv[d] += p * do_tile[r * DH + d];
                        // q_tile already carries the scale.
                        dk[d] += ds * q_tile[r * DH + d];
                    }
                }
            }
        }
        workgroupBarrier();
    }

    if (in_range) {
        for (var d = 0u; d < DH; d++) {
            dkv[head + j * DH + d] = dk[d];
            dkv[half_offset() * DH + head + j * DH + d] = dv[d];
        }
    }
}
