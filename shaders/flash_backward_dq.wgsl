// Flash attention backward, part 1: dQ. One invocation per query row; K and V stream through
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
    let i = row0 + lane;
    let live = i < n;
    let head = bh * n * DV;
    let scale = softmax_scale();

    var qi: array<vec4<f32>, DV>;
    var doi: array<vec4<f32>, DV>;
    var acc: array<vec4<f32>, DV>;
    var row_lse = 0.0;
    var row_d = 0.0;
    if (live) {
        for (var d = 0u; d < DV; d++) {
            qi[d] = vec4<f32>(q[head + i * DV + d]) * scale;
            doi[d] = vec4<f32>(dout[head + i * DV + d]);
        }
        row_lse = stats[bh * n + i];
        row_d = stats[half_offset() + bh * n + i];
    }

    let end = uniform_bounds(lane, 0u, key_end(row0)).y;
    for (var t0 = 0u; t0 < end; t0 += BC) {
        let cnt = min(BC, end - t0);
        load_kv_tile(lane, b, head, t0, cnt);
        workgroupBarrier();

        if (live) {
            for (var r = 0u; r < cnt; r += KB) {
                var s = vec4(0.0);
                var dp = vec4(0.0);
                for (var d = 0u; d < DV; d++) {
                    s += tile_dots(qi[d], TILE_K, r, d);
                    dp += tile_dots(doi[d], TILE_V, r, d);
                }
                let p = select(vec4(0.0), exp(s - row_lse), visible4(i, t0, r));
                let ds = p * (dp - row_d);
                for (var d = 0u; d < DV; d++) {
                    acc[d] += tile_mix(ds, TILE_K, r, d);
                }
            }
        }
        workgroupBarrier();
    }

    if (live) {
        for (var d = 0u; d < DV; d++) {
            dq[head + i * DV + d] = vec4<elem>(acc[d] * scale);
        }
    }
}
