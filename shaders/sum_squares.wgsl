// acc_out = acc_in + sum_i x_i^2 over up to five gradient tensors x0..x4, in one workgroup: global grad-norm
// clipping (optim::clip_grad_norm on wgpu; core/src/optim_gpu.rs launches it once per five parameters, each
// launch adding to the running total the last one wrote, the first to a zero). burn's full `sum` is a fill and
// an atomic sum after the square, plus an add for the running total: four launches per parameter instead of one
// per five. Five because WebGPU guarantees 8 storage buffers per shader stage (the five, acc_in, params,
// acc_out); unused slots are one-word stand-ins with a count of 0. One workgroup suffices: a gradient is read
// once, and the launches of one step run one after another anyway (each reads the previous total).
// Every binding is read_write: burn's memory pool packs many tensors into one wgpu buffer, and wgpu refuses a
// buffer bound read-only and read-write in the same dispatch.

@group(0) @binding(0) var<storage, read_write> x0: array<f32>;
@group(0) @binding(1) var<storage, read_write> x1: array<f32>;
@group(0) @binding(2) var<storage, read_write> x2: array<f32>;
@group(0) @binding(3) var<storage, read_write> x3: array<f32>;
@group(0) @binding(4) var<storage, read_write> x4: array<f32>;
@group(0) @binding(5) var<storage, read_write> acc_in: array<f32>;
// The element counts of x0..x4 (0 for an unused slot).
@group(0) @binding(6) var<storage, read_write> params: array<u32>;
@group(0) @binding(7) var<storage, read_write> acc_out: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) lane: u32) {
    var s = 0.0;
    for (var i = lane; i < params[0]; i += WG) {
        s += x0[i] * x0[i];
    }
    for (var i = lane; i < params[1]; i += WG) {
        s += x1[i] * x1[i];
    }
    for (var i = lane; i < params[2]; i += WG) {
        s += x2[i] * x2[i];
    }
    for (var i = lane; i < params[3]; i += WG) {
        s += x3[i] * x3[i];
    }
    for (var i = lane; i < params[4]; i += WG) {
        s += x4[i] * x4[i];
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
