// softmax(scale * x) over the last dim, one row per workgroup (the attention probabilities of the reference
// path; the scale is applied on the way in): y = exp(scale * x - m) / sum exp(scale * x - m), m the row's
// largest scaled value. Every binding is read_write (see layer_norm_forward.wgsl).

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
// [0] rows, [1] scale (f32 bits).
@group(0) @binding(1) var<storage, read_write> params: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let rows = params[0];
    let scale = bitcast<f32>(params[1]);
    let at = row_of(wid, groups, rows);
    let base = at.x * D;
    var v: array<f32, PER>;
    // The lowest f32 WGSL takes as a literal (-3.4028235e38, f32::MIN printed short, is out of range for Tint).
    var m = -3.4028234e38;
    for (var k = 0u; k < PER; k++) {
        let j = lane + k * WG;
        var e = -3.4028234e38;
        if (j < D) {
            e = scale * x[base + j];
        }
        v[k] = e;
        m = max(m, e);
    }
    let row_max = workgroup_max(lane, m);
    var s = 0.0;
    for (var k = 0u; k < PER; k++) {
        var e = 0.0;
        if (lane + k * WG < D) {
            e = exp(v[k] - row_max);
        }
        v[k] = e;
        s += e;
    }
    let inv = 1.0 / workgroup_sum(lane, s);
    if (at.y == 1u) {
        for (var k = 0u; k < PER; k++) {
            let j = lane + k * WG;
            if (j < D) {
                y[base + j] = v[k] * inv;
            }
        }
    }
}
