// K/V tiles in workgroup memory, shared by the forward and dQ kernels (one invocation per query row).

var<workgroup> k_tile: array<f32, BC * DH>;
var<workgroup> v_tile: array<f32, BC * DH>;
// 1.0 where the tile's key exists and is not padding.
var<workgroup> open: array<f32, BC>;

// Rows t0 .. t0 + cnt of one head's K and V (the head starts at `head`) into the tiles, zeros past
// `cnt`. Every invocation of the workgroup takes part; the caller puts a barrier after it.
fn load_kv_tile(lane: u32, b: u32, head: u32, t0: u32, cnt: u32) {
    for (var e = lane; e < BC * DH; e += BR) {
        let r = e / DH;
        var kv = 0.0;
        var vv = 0.0;
        if (r < cnt) {
            let src = head + (t0 + r) * DH + e % DH;
            kv = k[src];
            vv = v[src];
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
