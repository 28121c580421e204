// Shared by the row kernels, layer_norm_*.wgsl and softmax_*.wgsl (core/src/gpu_ops/kernels.rs prepends the
// constants): one workgroup of WG invocations per row of D values, invocation `lane` holding the row's elements
// lane, lane + WG, ... in registers (PER of them; D and PER are compiled in per width). The grid is 2-D where the
// rows outnumber one dimension's 65,535 workgroups; the surplus workgroups of the last grid row compute row
// `rows - 1` again and write nothing, so every barrier stays in uniform control flow.

const WG: u32 = 64u;
var<workgroup> partial: array<f32, WG>;

// The workgroup's row, and whether it is a real one (not a surplus workgroup of the grid).
fn row_of(wid: vec3<u32>, groups: vec3<u32>, rows: u32) -> vec2<u32> {
    let row = wid.y * groups.x + wid.x;
    return vec2<u32>(min(row, rows - 1u), select(0u, 1u, row < rows));
}

// The largest `value` over the workgroup.
fn workgroup_max(lane: u32, value: f32) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            partial[lane] = max(partial[lane], partial[lane + stride]);
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// The sum of `value` over the workgroup, in a fixed order (a tree over lanes): the same bits on every run.
fn workgroup_sum(lane: u32, value: f32) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}
