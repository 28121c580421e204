// Layer norm over the last dim, one row per workgroup: y = (x - mean) * rstd * gamma + beta with the biased
// variance, rstd = 1 / sqrt(var + eps); also each row's (mean, rstd) for the backward pass. Two passes over the
// row held in registers (the mean, then the centred squares: no cancellation for rows far from zero).
// x, gamma, beta and the statistics are f32; y is `elem`, which the host prepends: f32, or f16 where a
// mixed-precision block wants its normalised input in f16 and the adapter has shader-f16 (arithmetic in f32).
// Every binding is read_write: burn's memory pool packs many tensors into one wgpu buffer, and wgpu refuses a
// buffer bound read-only and read-write in the same dispatch.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> beta: array<f32>;
// [0] rows, [1] eps (f32 bits).
@group(0) @binding(3) var<storage, read_write> params: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<elem>;
// [rows, 2]: mean, rstd.
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let rows = params[0];
    let eps = bitcast<f32>(params[1]);
    let at = row_of(wid, groups, rows);
    let base = at.x * D;
    var v: array<f32, PER>;
    var s = 0.0;
    for (var k = 0u; k < PER; k++) {
        let j = lane + k * WG;
        var e = 0.0;
        if (j < D) {
            e = x[base + j];
        }
        v[k] = e;
        s += e;
    }
    let mean = workgroup_sum(lane, s) / f32(D);
    var q = 0.0;
    for (var k = 0u; k < PER; k++) {
        if (lane + k * WG < D) {
            let c = v[k] - mean;
            q += c * c;
        }
    }
    let rstd = 1.0 / sqrt(workgroup_sum(lane, q) / f32(D) + eps);
    if (at.y == 1u) {
        for (var k = 0u; k < PER; k++) {
            let j = lane + k * WG;
            if (j < D) {
                y[base + j] = elem((v[k] - mean) * rstd * gamma[j] + beta[j]);
            }
        }
        if (lane == 0u) {
            stats[2u * at.x] = mean;
            stats[2u * at.x + 1u] = rstd;
        }
    }
}
