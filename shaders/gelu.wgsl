// Exact (erf) GELU, element-wise: forward y = x * Phi(x), backward dx = g * (Phi(x) + x * phi(x)), with
// Phi(x) = (1 + erf(x / sqrt 2)) / 2 and phi the standard normal density. WGSL has no erf: the same
// approximation as the CPU kernels (kernels/src, `erf_given_exp`): its Taylor series below |x| = 0.75, Abramowitz
// and Stegun 7.1.26 above, both in f32. core/src/gpu_ops/kernels.rs prepends BACKWARD (0 or 1) and `elem`, the
// storage type (f16 under mixed precision where the adapter has shader-f16, else f32; arithmetic is f32).
// 256 invocations per workgroup, one element each; the grid is 2-D for more than 65,535 workgroups.
// Every binding is read_write (see layer_norm_forward.wgsl); the backward reads g, the forward ignores it.

@group(0) @binding(0) var<storage, read_write> x: array<elem>;
@group(0) @binding(1) var<storage, read_write> g: array<elem>;
// [0] the element count.
@group(0) @binding(2) var<storage, read_write> params: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<elem>;

// erf(x) given e = exp(-x^2).
fn erf_given_exp(x: f32, e: f32) -> f32 {
    // 2/sqrt(pi) * (-1)^n / (n! (2n + 1)), n = 0..=9, by Horner in x^2.
    let x2 = x * x;
    var s = -1.6365845e-7;
    s = s * x2 + 1.6462114e-6;
    s = s * x2 - 1.492565e-5;
    s = s * x2 + 1.2055333e-4;
    s = s * x2 - 8.548327e-4;
    s = s * x2 + 0.005223978;
    s = s * x2 - 0.026866170;
    s = s * x2 + 0.11283792;
    s = s * x2 - 0.37612638;
    s = s * x2 + 1.1283792;
    let series = x * s;
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.2548296 + t * (-0.28449674 + t * (1.4214137 + t * (-1.4531521 + t * 1.0614054))));
    let tail = select(-(1.0 - poly * e), 1.0 - poly * e, x >= 0.0);
    return select(tail, series, a < 0.75);
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let i = (wid.y * groups.x + wid.x) * 256u + lane;
    if (i >= params[0]) {
        return;
    }
    let v = f32(x[i]);
    let e = exp(-0.5 * v * v);
    let cdf = 0.5 * (1.0 + erf_given_exp(v * 0.70710678, e));
    if (BACKWARD == 1u) {
        out[i] = elem(f32(g[i]) * (cdf + v * 0.3989423 * e));
    } else {
        out[i] = elem(v * cdf);
    }
}
