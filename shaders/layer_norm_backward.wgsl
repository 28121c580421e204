// The input gradient of layer_norm_forward.wgsl, one row per workgroup, from the upstream gradient g and the
// row's (mean, rstd): with xhat = (x - mean) * rstd and gh = g * gamma,
// dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)). dgamma and dbeta are layer_norm_params.wgsl's.
// g is `elem`, the forward output's type (f32 or f16); everything else, dx included, is f32.
// Every binding is read_write (see layer_norm_forward.wgsl).

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> g: array<elem>;
// [0] rows.
@group(0) @binding(4) var<storage, read_write> params: array<u32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let rows = params[0];
    let at = row_of(wid, groups, rows);
    let base = at.x * D;
    let mean = stats[2u * at.x];
    let rstd = stats[2u * at.x + 1u];
    var xhat: array<f32, PER>;
    var gh: array<f32, PER>;
    var a = 0.0;
    var b = 0.0;
    for (var k = 0u; k < PER; k++) {
        let j = lane + k * WG;
        var xh = 0.0;
        var gg = 0.0;
        if (j < D) {
            xh = (x[base + j] - mean) * rstd;
            gg = f32(g[base + j]) * gamma[j];
        }
        xhat[k] = xh;
        gh[k] = gg;
        a += gg;
        b += gg * xh;
    }
    let mean_gh = workgroup_sum(lane, a) / f32(D);
    let mean_ghx = workgroup_sum(lane, b) / f32(D);
    if (at.y == 1u) {
        for (var k = 0u; k < PER; k++) {
            let j = lane + k * WG;
            if (j < D) {
                dx[base + j] = rstd * (gh[k] - mean_gh - xhat[k] * mean_ghx);
            }
        }
    }
}
