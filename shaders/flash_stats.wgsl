// The flash backward pass's row statistics in one buffer, [L | D]: L, each query row's log-sum-exp from the
// forward pass, copied, and D_i = dO_i . O_i in f32, which both backward kernels read (Dao et al. 2022,
// algorithm 2: D = rowsum(dO * O)). One invocation per row of every (batch, head); one launch where burn's
// ops took a multiply, a sum and a concatenation.
//
// The host prepends `elem` (f32, or f16 where the adapter has shader-f16) and DV, the vec4s per row.
// Every binding is read_write: see flash_common.wgsl.

@group(0) @binding(0) var<storage, read_write> out: array<vec4<elem>>;
@group(0) @binding(1) var<storage, read_write> grad_out: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
// [0] rows, B*H*N.
@group(0) @binding(3) var<storage, read_write> params: array<u32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

const WG: u32 = 256u;

// A 2-D grid of workgroups (one dimension holds at most 65,535), read as one index.
@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let rows = params[0];
    let i = (wg.y * groups.x + wg.x) * WG + lane;
    if (i >= rows) {
        return;
    }
    var d = 0.0;
    for (var c = 0u; c < DV; c++) {
        d += dot(vec4<f32>(grad_out[i * DV + c]), vec4<f32>(out[i * DV + c]));
    }
    stats[i] = lse[i];
    stats[rows + i] = d;
}
