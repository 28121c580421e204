// K/V tiles in workgroup memory, shared by the forward and dQ kernels (one invocation per query row).

const TILE_K: u32 = 0u;
const TILE_V: u32 = BC * DV;
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
        tile[TILE_K + e] = kv;
        tile[TILE_V + e] = vv;
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
