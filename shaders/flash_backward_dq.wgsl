// Flash attention backward, part 1: dQ. Each lane holds its share of SPLIT query rows; K and V stream through
// workgroup memory as in the forward pass. Probabilities are recomputed from the saved log-sum-exp,
// P_ij = exp(s_ij - L_i), so no N x N matrix is stored:
//   dS_ij = P_ij (dO_i . V_j - D_i),  D_i = dO_i . O_i,   dQ_i = scale * sum_j dS_ij K_j.

@group(0) @binding(5) var<storage, read_write> dout: array<vec4<elem>>;
// [L | D], each B*H*N.
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<vec4<elem>>;

@compute @workgroup_size(BR)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n = seq_len();
    let bh = wg.y;
    let b = batch_of(bh);
    let row0 = wg.x * BR;
    // This lane's query rows, first .. first + SPLIT - 1, and its share of each: vec4s col .. col + DQ - 1.
    let first = row0 + lane / SPLIT * SPLIT;
    let col = lane % SPLIT * DQ;
    let head = bh * n * DV;
    let scale = softmax_scale();

    // Row t's share at t * DQ.
    var qi: array<vec4<f32>, SPLIT * DQ>;
    var doi: array<vec4<f32>, SPLIT * DQ>;
    var acc: array<vec4<f32>, SPLIT * DQ>;
    var row_lse: array<f32, SPLIT>;
    var row_d: array<f32, SPLIT>;
    for (var t = 0u; t < SPLIT; t++) {
        let i = first + t;
        if (i < n) {
            for (var d = 0u; d < DQ; d++) {
                qi[t * DQ + d] = vec4<f32>(q[head + i * DV + col + d]) * scale;
                doi[t * DQ + d] = vec4<f32>(dout[head + i * DV + col + d]);
            }
            row_lse[t] = stats[bh * n + i];
            row_d[t] = stats[half_offset() + bh * n + i];
        }
    }

    let end = uniform_bounds(lane, 0u, key_end(row0)).y;
    for (var t0 = 0u; t0 < end; t0 += BC) {
        let cnt = min(BC, end - t0);
        load_kv_tile(lane, b, head, t0, cnt);
        workgroupBarrier();

        for (var r = 0u; r < cnt; r += KB) {
            var s = array<vec4<f32>, SPLIT>();
            var dp = array<vec4<f32>, SPLIT>();
            for (var d = 0u; d < DQ; d++) {
                let keys = tile4(TILE_K, r, col + d);
                let values = tile4(TILE_V, r, col + d);
                for (var t = 0u; t < SPLIT; t++) {
                    s[t] += qi[t * DQ + d] * keys;
                    dp[t] += doi[t * DQ + d] * values;
                }
            }
            var ds = array<vec4<f32>, SPLIT>();
            for (var t = 0u; t < SPLIT; t++) {
                let p = select(vec4(0.0), exp(lanes_sum(s[t]) - row_lse[t]), visible4(first + t, t0, r));
                ds[t] = p * (lanes_sum(dp[t]) - row_d[t]);
            }
            for (var d = 0u; d < DQ; d++) {
                let keys = tile4(TILE_K, r, col + d);
                for (var t = 0u; t < SPLIT; t++) {
                    acc[t * DQ + d] += keys * ds[t];
                }
            }
        }
        workgroupBarrier();
    }

    for (var t = 0u; t < SPLIT; t++) {
        let i = first + t;
        if (i < n) {
            for (var d = 0u; d < DQ; d++) {
                dq[head + i * DV + col + d] = vec4<elem>(acc[t * DQ + d] * scale);
            }
        }
    }
}
