// Flash attention forward: O = softmax(scale * Q K^T + mask) V and the row-wise log-sum-exp L,
// in one pass over K and V with an online softmax (Dao et al. 2022, algorithm 1). The N x N score
// matrix never exists: each invocation keeps its query row, a running max m, a running sum l and
// an unnormalised output row in registers, and K/V stream through workgroup memory a tile at a time.

@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// [B*H*N]: m + ln(l) per query row, what the backward pass recomputes the probabilities from.
// Rows with no visible key get +3e38, so every recomputed probability of theirs is exp(-inf) = 0.
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(BR)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n = seq_len();
    let bh = wg.y;
    let b = batch_of(bh);
    let row0 = wg.x * BR;
    let i = row0 + lane;
    let live = i < n;
    let head = bh * n * DH;

    // The scale is folded into q once instead of into every score.
    var qi: array<f32, DH>;
    var acc: array<f32, DH>;
    var s: array<f32, BC>;
    if (live) {
        let scale = softmax_scale();
        for (var d = 0u; d < DH; d++) {
            qi[d] = q[head + i * DH + d] * scale;
        }
    }
    var m = MASKED;
    var l = 0.0;

    let end = uniform_bounds(lane, 0u, key_end(row0)).y;
    for (var t0 = 0u; t0 < end; t0 += BC) {
        let cnt = min(BC, end - t0);
        load_kv_tile(lane, b, head, t0, cnt);
        workgroupBarrier();

        if (live) {
            var tile_max = MASKED;
            for (var r = 0u; r < cnt; r++) {
                var score = MASKED;
                if (open[r] != 0.0 && allowed(i, t0 + r)) {
                    score = 0.0;
                    for (var d = 0u; d < DH; d++) {
                        score += qi[d] * k_tile[r * DH + d];
                    }
                }
                s[r] = score;
                tile_max = max(tile_max, score);
            }
            if (tile_max > MASKED) {
                // Rescale what was accumulated under the old max once per tile, not once per key.
                let m_new = max(m, tile_max);
                let correction = exp(m - m_new);
                l *= correction;
                for (var d = 0u; d < DH; d++) {
                    acc[d] *= correction;
                }
                for (var r = 0u; r < cnt; r++) {
                    if (s[r] > MASKED) {
                        let p = exp(s[r] - m_new);
                        l += p;
                        for (var d = 0u; d < DH; d++) {
                            acc[d] += p * v_tile[r * DH + d];
                        }
                    }
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }

    if (live) {
        // A row that sees no key at all outputs zeros (the reference path agrees: see attention.rs).
        var inv = 0.0;
        var row_lse = -MASKED;
        if (l > 0.0) {
            inv = 1.0 / l;
            row_lse = m + log(l);
        }
        for (var d = 0u; d < DH; d++) {
            out[head + i * DH + d] = acc[d] * inv;
        }
        lse[bh * n + i] = row_lse;
    }
}
