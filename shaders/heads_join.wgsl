// The gradients of an attention layer's q, k and v heads, each [B, H, N, Dh], written into the gradient of the
// fused projection they were split from, [B, N, 3, H, Dh] (q, k, v in thirds, heads within each): the
// backward of the head split in core/src/gpu_ops/attention.rs, one launch where burn's ops took a
// slice-assign per third. core/src/gpu_ops/kernels.rs prepends `elem`, the storage type (f32, or f16 where
// the adapter has shader-f16). One invocation per element of the output; the grid is 2-D for more than
// 65,535 workgroups. Every binding is read_write (see layer_norm_forward.wgsl).

@group(0) @binding(0) var<storage, read_write> dq: array<elem>;
@group(0) @binding(1) var<storage, read_write> dk: array<elem>;
@group(0) @binding(2) var<storage, read_write> dv: array<elem>;
// [0] N, [1] H, [2] Dh, [3] the element count (3 B H N Dh).
@group(0) @binding(3) var<storage, read_write> params: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<elem>;

const WG: u32 = 256u;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let o = (wg.y * groups.x + wg.x) * WG + lane;
    if (o >= params[3]) {
        return;
    }
    let n = params[0];
    let h = params[1];
    let dh = params[2];
    // o = (((b N + t) 3 + part) H + head) Dh + d
    let d = o % dh;
    let head = (o / dh) % h;
    let part = (o / (dh * h)) % 3u;
    let t = (o / (dh * h * 3u)) % n;
    let b = o / (dh * h * 3u * n);
    let i = ((b * h + head) * n + t) * dh + d;
    if (part == 0u) {
        out[o] = dq[i];
    } else if (part == 1u) {
        out[o] = dk[i];
    } else {
        out[o] = dv[i];
    }
}
