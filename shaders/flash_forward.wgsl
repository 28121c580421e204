// Flash attention forward: O = softmax(scale * Q K^T + mask) V and the row-wise log-sum-exp L,
// in one pass over K and V with an online softmax (Dao et al. 2022, algorithm 1). The N x N score
// matrix never exists: each invocation keeps its query row, a running max m, a running sum l and
// an unnormalised output row in registers, and K/V stream through workgroup memory a tile at a time.

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
    let i = row0 + lane;
    let live = i < n;
    let head = bh * n * DV;

    // The scale is folded into q once instead of into every score.
    var qi: array<vec4<f32>, DV>;
    var acc: array<vec4<f32>, DV>;
    if (live) {
        let scale = softmax_scale();
        for (var d = 0u; d < DV; d++) {
            qi[d] = vec4<f32>(q[head + i * DV + d]) * scale;
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
            for (var r = 0u; r < cnt; r += KB) {
                var s = vec4(0.0);
                for (var d = 0u; d < DV; d++) {
                    s += tile_dots(qi[d], TILE_K, r, d);
                }
                s = select(vec4(MASKED), s, visible4(i, t0, r));
                let block_max = max(max(s.x, s.y), max(s.z, s.w));
                if (block_max > MASKED) {
                    // Rescale what was accumulated under the old max once per KB keys.
                    let m_new = max(m, block_max);
                    let correction = exp(m - m_new);
                    // A masked score sits ~3e38 below m_new: its exp is exactly 0.
                    let p = exp(s - m_new);
                    l = l * correction + (p.x + p.y + p.z + p.w);
                    for (var d = 0u; d < DV; d++) {
                        acc[d] = acc[d] * correction + tile_mix(p, TILE_V, r, d);
                    }
                    m = m_new;
                }
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
        for (var d = 0u; d < DV; d++) {
            out[head + i * DV + d] = vec4<elem>(acc[d] * inv);
        }
        lse[bh * n + i] = row_lse;
    }
}
