// acc_out = acc_in + sum_i x_i^2 over one gradient tensor, in one workgroup: global grad-norm clipping
// (optim::clip_grad_norm on wgpu; core/src/optim_gpu.rs launches it once per parameter, each launch adding to
// the running total the last one wrote). burn's full `sum` is a fill and an atomic sum after the square, plus an
// add for the running total: four launches per parameter instead of one. One workgroup suffices: a gradient is
// read once, and the launches of one step run one after another anyway (each reads the previous total).
// Every binding is read_write: burn's memory pool packs many tensors into one wgpu buffer, and wgpu refuses a
// buffer bound read-only and read-write in the same dispatch.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> acc_in: array<f32>;
// [0] the element count of x.
@group(0) @binding(2) var<storage, read_write> params: array<u32>;
@group(0) @binding(3) var<storage, read_write> acc_out: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) lane: u32) {
    let n = params[0];
    var s = 0.0;
    for (var i = lane; i < n; i += WG) {
        let v = x[i];
        s += v * v;
    }
    partial[lane] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        acc_out[0] = acc_in[0] + partial[0];
    }
}
