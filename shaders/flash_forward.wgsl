// Flash attention forward: O = softmax(scale * Q K^T + mask) V and the row-wise log-sum-exp L,
// in one pass over K and V with an online softmax (Dao et al. 2022, algorithm 1). The N x N score
// matrix never exists: each lane keeps its share of SPLIT query rows, their running maxima m, running
// sums l and unnormalised output rows in registers, and K/V stream through workgroup memory a tile at a time.

@group(0) @binding(5) var<storage, read_write> out: array<vec4<elem>>;
// [B*H*N]: m + ln(l) per query row, what the backward pass recomputes the probabilities from.
// Rows with no visible key get +3e38, so every recomputed probability of theirs is exp(-inf) = 0.
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

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

    // Row t's share at t * DQ. The scale is folded into q once instead of into every score.
    var qi: array<vec4<f32>, SPLIT * DQ>;
    var acc: array<vec4<f32>, SPLIT * DQ>;
    var m: array<f32, SPLIT>;
    var l: array<f32, SPLIT>;
    let scale = softmax_scale();
    for (var t = 0u; t < SPLIT; t++) {
        m[t] = MASKED;
        if (first + t < n) {
            for (var d = 0u; d < DQ; d++) {
                qi[t * DQ + d] = vec4<f32>(q[head + (first + t) * DV + col + d]) * scale;
            }
        }
    }

    let end = uniform_bounds(lane, 0u, key_end(row0)).y;
    for (var t0 = 0u; t0 < end; t0 += BC) {
        let cnt = min(BC, end - t0);
        load_kv_tile(lane, b, head, t0, cnt);
        workgroupBarrier();

        for (var r = 0u; r < cnt; r += KB) {
            var s = array<vec4<f32>, SPLIT>();
            for (var d = 0u; d < DQ; d++) {
                let keys = tile4(TILE_K, r, col + d);
                for (var t = 0u; t < SPLIT; t++) {
                    s[t] += qi[t * DQ + d] * keys;
                }
            }
            // Rescale what was accumulated under the old max once per KB keys. A block with no visible key
            // leaves a row as it was: p = 0 and, while m is still MASKED, correction = exp(0) = 1.
            var p = array<vec4<f32>, SPLIT>();
            var correction = array<f32, SPLIT>();
            for (var t = 0u; t < SPLIT; t++) {
                let visible = visible4(first + t, t0, r);
                let st = select(vec4(MASKED), lanes_sum(s[t]), visible);
                let m_new = max(m[t], max(max(st.x, st.y), max(st.z, st.w)));
                correction[t] = exp(m[t] - m_new);
                p[t] = select(vec4(0.0), exp(st - m_new), visible);
                l[t] = l[t] * correction[t] + (p[t].x + p[t].y + p[t].z + p[t].w);
                m[t] = m_new;
            }
            for (var d = 0u; d < DQ; d++) {
                let values = tile4(TILE_V, r, col + d);
                for (var t = 0u; t < SPLIT; t++) {
                    acc[t * DQ + d] = acc[t * DQ + d] * correction[t] + values * p[t];
                }
            }
        }
        workgroupBarrier();
    }

    for (var t = 0u; t < SPLIT; t++) {
        let i = first + t;
        if (i < n) {
            // A row that sees no key at all outputs zeros (the reference path agrees: see attention.rs).
            var inv = 0.0;
            var row_lse = -MASKED;
            if (l[t] > 0.0) {
                inv = 1.0 / l[t];
                row_lse = m[t] + log(l[t]);
            }
            for (var d = 0u; d < DQ; d++) {
                out[head + i * DV + col + d] = vec4<elem>(acc[t * DQ + d] * inv);
            }
            if (col == 0u) {
                lse[bh * n + i] = row_lse;
            }
        }
    }
}
