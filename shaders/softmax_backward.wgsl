// The input gradient of softmax_forward.wgsl from its output y and the upstream gradient g, one row per
// workgroup: dx = scale * y * (g - sum_j y_j g_j). Every binding is read_write (see layer_norm_forward.wgsl).

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read_write> g: array<f32>;
// [0] rows, [1] scale (f32 bits).
@group(0) @binding(2) var<storage, read_write> params: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

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
    var yv: array<f32, PER>;
    var gv: array<f32, PER>;
    var dot = 0.0;
    for (var k = 0u; k < PER; k++) {
        let j = lane + k * WG;
        var a = 0.0;
        var b = 0.0;
        if (j < D) {
            a = y[base + j];
            b = g[base + j];
        }
        yv[k] = a;
        gv[k] = b;
        dot += a * b;
    }
    let total = workgroup_sum(lane, dot);
    if (at.y == 1u) {
        for (var k = 0u; k < PER; k++) {
            let j = lane + k * WG;
            if (j < D) {
                dx[base + j] = scale * yv[k] * (gv[k] - total);
            }
        }
    }
}
