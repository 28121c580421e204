// One AdamW step on one parameter tensor, every element in one invocation (optim::AdamW on wgpu;
// core/src/optim_gpu.rs launches it). burn's AdamW takes a dozen element-wise kernels per parameter,
// each a dispatch that reads and writes the whole tensor; this is one. The same arithmetic as the CPU
// kernel (kernels/src/lib.rs `adamw`), in f32, with g = s * grad (s: grad-norm clipping's factor over the
// loss scale, so clipping needs no pass of its own over the gradient):
//   m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,
//   p' = decay p - lr (m' / c1) / (sqrt(v' / c2) + eps)      (decay = 1 - lr * weight_decay)
// Every binding is read_write: burn's memory pool packs many tensors into one wgpu buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.

@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> moment_1: array<f32>;
@group(0) @binding(3) var<storage, read_write> moment_2: array<f32>;
// [0] lr, [1] b1, [2] b2, [3] eps, [4] decay, [5] c1 = 1 - b1^t, [6] c2 = 1 - b2^t, [7] element count (u32 bits),
// [8] s, the gradient's factor.
@group(0) @binding(4) var<storage, read_write> h: array<f32, 9>;
@group(0) @binding(5) var<storage, read_write> param_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> moment_1_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> moment_2_out: array<f32>;

const WG: u32 = 256u;

// A 2-D grid of workgroups (one dimension holds at most 65,535), read as one index.
@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let i = (wg.y * groups.x + wg.x) * WG + lane;
    if (i >= bitcast<u32>(h[7])) {
        return;
    }
    let g = h[8] * grad[i];
    let m = h[1] * moment_1[i] + (1.0 - h[1]) * g;
    let v = h[2] * moment_2[i] + (1.0 - h[2]) * (g * g);
    let delta = (m / h[5]) / (sqrt(v / h[6]) + h[3]);
    param_out[i] = h[4] * param[i] - h[0] * delta;
    moment_1_out[i] = m;
    moment_2_out[i] = v;
}
