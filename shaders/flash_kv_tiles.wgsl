// K/V tiles in workgroup memory, shared by the forward and dQ kernels (one invocation per query row).

var<workgroup> k_tile: array<vec4<f32>, BC * DV>;
var<workgroup> v_tile: array<vec4<f32>, BC * DV>;
// 1.0 where the tile's key exists and is not padding.
var<workgroup> open: array<f32, BC>;

// Rows t0 .. t0 + cnt of one head's K and V (the head starts at vec4 `head`) into the tiles, zeros
// past `cnt`. Consecutive invocations read consecutive vec4s, so the global reads coalesce. Every
// invocation of the workgroup takes part; the caller puts a barrier after it.
fn load_kv_tile(lane: u32, b: u32, head: u32, t0: u32, cnt: u32) {
    for (var e = lane; e < BC * DV; e += BR) {
        let r = e / DV;
        var kv = vec4(0.0);
        var vv = vec4(0.0);
        if (r < cnt) {
            let src = head + (t0 + r) * DV + e % DV;
            kv = vec4<f32>(k[src]);
            vv = vec4<f32>(v[src]);
        }
        k_tile[e] = kv;
        v_tile[e] = vv;
    }
    for (var r = lane; r < BC; r += BR) {
        var o = 0.0;
        if (r < cnt && key_open(b, t0 + r)) {
            o = 1.0;
        }
        open[r] = o;
    }
}

// Which of the tile's keys r .. r + 3 query i may see: open, and allowed by the rule. Keys past the
// tile's count are closed, so a block may run past `cnt` (BC is a multiple of KB).
fn visible4(i: u32, t0: u32, r: u32) -> vec4<bool> {
    let o = vec4(open[r], open[r + 1u], open[r + 2u], open[r + 3u]) != vec4(0.0);
    return o & allowed4(i, t0 + r);
}

// The dot products of `a` with vec4 d of the tile's K rows r .. r + 3.
fn k_dots(a: vec4<f32>, r: u32, d: u32) -> vec4<f32> {
    return vec4(
        dot(a, k_tile[r * DV + d]),
        dot(a, k_tile[(r + 1u) * DV + d]),
        dot(a, k_tile[(r + 2u) * DV + d]),
        dot(a, k_tile[(r + 3u) * DV + d]),
    );
}

// The same with V rows r .. r + 3.
fn v_dots(a: vec4<f32>, r: u32, d: u32) -> vec4<f32> {
    return vec4(
        dot(a, v_tile[r * DV + d]),
        dot(a, v_tile[(r + 1u) * DV + d]),
        dot(a, v_tile[(r + 2u) * DV + d]),
        dot(a, v_tile[(r + 3u) * DV + d]),
    );
}
