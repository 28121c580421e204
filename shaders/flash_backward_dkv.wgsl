// Flash attention backward, part 2: dK or dV. One invocation per key row; Q, dO and the per-row
// statistics stream through workgroup memory. Splitting dQ from dK/dV costs a recomputation of the
// scores but needs no atomics, which WGSL does not have for floats.
//   dV_j = sum_i P_ij dO_i,   dK_j = scale * sum_i dS_ij Q_i.
// The host compiles this file twice, with PART = 0 (dK) and PART = 1 (dV), and launches both: one
// kernel holding K_j, V_j, dK_j and dV_j would need 4 * DH registers per invocation and spill.

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
    let j = col0 + lane;
    let in_range = j < n;
    let head = bh * n * DV;
    let scale = softmax_scale();

    // A padding key is seen by no query: its gradients are zero, but they are still written.
    var attended = false;
    var kj: array<vec4<f32>, DV>;
    var vj: array<vec4<f32>, DV>;
    var acc: array<vec4<f32>, DV>;
    if (in_range) {
        attended = key_open(b, j);
        for (var d = 0u; d < DV; d++) {
            kj[d] = vec4<f32>(k[head + j * DV + d]);
            if (PART == PART_DK) {
                vj[d] = vec4<f32>(v[head + j * DV + d]);
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

        if (attended) {
            for (var r = 0u; r < cnt; r += KB) {
                // Queries past the tile's count are zero rows with L = 0: closed explicitly.
                let exists = vec4(r, r + 1u, r + 2u, r + 3u) < vec4(cnt);
                let visible = exists & allowed4_queries(t0 + r, j);
                let row_lse = vec4(lse_tile[r], lse_tile[r + 1u], lse_tile[r + 2u], lse_tile[r + 3u]);
                var s = vec4(0.0);
                var dp = vec4(0.0);
                for (var d = 0u; d < DV; d++) {
                    s += tile_dots(kj[d], TILE_Q, r, d);
                    if (PART == PART_DK) {
                        dp += tile_dots(vj[d], TILE_DO, r, d);
                    }
                }
                let p = select(vec4(0.0), exp(s - row_lse), visible);
                if (PART == PART_DK) {
                    let row_d = vec4(d_tile[r], d_tile[r + 1u], d_tile[r + 2u], d_tile[r + 3u]);
                    let ds = p * (dp - row_d);
                    // The Q tile already carries the scale.
                    for (var d = 0u; d < DV; d++) {
                        acc[d] += tile_mix(ds, TILE_Q, r, d);
                    }
                } else {
                    for (var d = 0u; d < DV; d++) {
                        acc[d] += tile_mix(p, TILE_DO, r, d);
                    }
                }
            }
        }
        workgroupBarrier();
    }

    if (in_range) {
        for (var d = 0u; d < DV; d++) {
            dkv[PART * half_offset() * DV + head + j * DV + d] = vec4<elem>(acc[d]);
        }
    }
}
