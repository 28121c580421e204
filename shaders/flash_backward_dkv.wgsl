// Flash attention backward, part 2: dK or dV. Each lane holds its share of SPLIT key rows; Q, dO and the
// per-row statistics stream through workgroup memory. Splitting dQ from dK/dV costs a recomputation of the
// scores but needs no atomics, which WGSL does not have for floats.
//   dV_j = sum_i P_ij dO_i,   dK_j = scale * sum_i dS_ij Q_i.
// The host compiles this file twice, with PART = 0 (dK) and PART = 1 (dV), and launches both: one
// kernel holding K_j, V_j, dK_j and dV_j would need 4 * DH registers per row and spill.

@group(0) @binding(5) var<storage, read_write> dout: array<vec4<elem>>;
// [L | D], each B*H*N.
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
// [dK | dV], each B*H*N*DH.
@group(0) @binding(7) var<storage, read_write> dkv: array<vec4<elem>>;

const PART_DK: u32 = 0u;

const TILE_Q: u32 = 0u;
const TILE_DO: u32 = BC * DV;
var<workgroup> lse_tile: array<f32, BC>;
var<workgroup> d_tile: array<f32, BC>;

@compute @workgroup_size(BR)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n = seq_len();
    let bh = wg.y;
    let b = batch_of(bh);
    let col0 = wg.x * BR;
    // This lane's key rows, first .. first + SPLIT - 1, and its share of each: vec4s col .. col + DQ - 1.
    let first = col0 + lane / SPLIT * SPLIT;
    let col = lane % SPLIT * DQ;
    let head = bh * n * DV;
    let scale = softmax_scale();

    // Row t's share at t * DQ. A padding key is seen by no query: its gradients are zero, but they are
    // still written.
    var attended: array<bool, SPLIT>;
    var kj: array<vec4<f32>, SPLIT * DQ>;
    var vj: array<vec4<f32>, SPLIT * DQ>;
    var acc: array<vec4<f32>, SPLIT * DQ>;
    for (var t = 0u; t < SPLIT; t++) {
        let j = first + t;
        if (j < n) {
            attended[t] = key_open(b, j);
            for (var d = 0u; d < DQ; d++) {
                kj[t * DQ + d] = vec4<f32>(k[head + j * DV + col + d]);
                if (PART == PART_DK) {
                    vj[t * DQ + d] = vec4<f32>(v[head + j * DV + col + d]);
                }
            }
        }
    }

    let bounds = uniform_bounds(lane, query_start(col0), n);
    for (var t0 = bounds.x; t0 < bounds.y; t0 += BC) {
        let cnt = min(BC, bounds.y - t0);
        for (var e = lane; e < BC * DV; e += BR) {
            let r = e / DV;
            var qv = vec4(0.0);
            var dov = vec4(0.0);
            if (r < cnt) {
                let src = head + (t0 + r) * DV + e % DV;
                qv = vec4<f32>(q[src]) * scale;
                dov = vec4<f32>(dout[src]);
            }
            tile[TILE_Q + e] = qv;
            tile[TILE_DO + e] = dov;
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

        for (var r = 0u; r < cnt; r += KB) {
            // Queries past the tile's count are zero rows with L = 0: closed explicitly.
            let exists = vec4(r, r + 1u, r + 2u, r + 3u) < vec4(cnt);
            let row_lse = vec4(lse_tile[r], lse_tile[r + 1u], lse_tile[r + 2u], lse_tile[r + 3u]);
            var s = array<vec4<f32>, SPLIT>();
            var dp = array<vec4<f32>, SPLIT>();
            for (var d = 0u; d < DQ; d++) {
                let queries = tile4(TILE_Q, r, col + d);
                for (var t = 0u; t < SPLIT; t++) {
                    s[t] += kj[t * DQ + d] * queries;
                }
                if (PART == PART_DK) {
                    let grads = tile4(TILE_DO, r, col + d);
                    for (var t = 0u; t < SPLIT; t++) {
                        dp[t] += vj[t * DQ + d] * grads;
                    }
                }
            }
            // dS for dK (the Q tile already carries the scale), P for dV.
            var w = array<vec4<f32>, SPLIT>();
            for (var t = 0u; t < SPLIT; t++) {
                let visible = exists & allowed4_queries(t0 + r, first + t) & vec4(attended[t]);
                let p = select(vec4(0.0), exp(lanes_sum(s[t]) - row_lse), visible);
                if (PART == PART_DK) {
                    let row_d = vec4(d_tile[r], d_tile[r + 1u], d_tile[r + 2u], d_tile[r + 3u]);
                    w[t] = p * (lanes_sum(dp[t]) - row_d);
                } else {
                    w[t] = p;
                }
            }
            // dK sums the Q tile's rows, dV the dO tile's.
            let mixed = select(TILE_DO, TILE_Q, PART == PART_DK);
            for (var d = 0u; d < DQ; d++) {
                let rows = tile4(mixed, r, col + d);
                for (var t = 0u; t < SPLIT; t++) {
                    acc[t * DQ + d] += rows * w[t];
                }
            }
        }
        workgroupBarrier();
    }

    for (var t = 0u; t < SPLIT; t++) {
        let j = first + t;
        if (j < n) {
            for (var d = 0u; d < DQ; d++) {
                dkv[PART * half_offset() * DV + head + j * DV + col + d] = vec4<elem>(acc[t * DQ + d]);
            }
        }
    }
}
