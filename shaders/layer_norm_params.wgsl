// The parameter gradients of layer_norm_forward.wgsl, summed over rows: dgamma = sum g * xhat, dbeta = sum g,
// with xhat = (x - mean) * rstd. Invocation (column j, chunk c) sums rows c * CHUNK .. (c + 1) * CHUNK of column
// j (neighbouring invocations read neighbouring columns) and writes partial[c][0][j] = its dgamma part and
// partial[c][1][j] = its dbeta part; core/src/gpu_ops/kernels.rs sums the chunks (one reduction) when there is
// more than one. Each sum runs in row order: the same bits on every run. g is `elem` (f32 or f16), the rest f32.
// Every binding is read_write (see layer_norm_forward.wgsl).

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;
@group(0) @binding(2) var<storage, read_write> g: array<elem>;
// [0] rows, [1] CHUNK (rows per chunk).
@group(0) @binding(3) var<storage, read_write> params: array<u32>;
// [chunks, 2, D].
@group(0) @binding(4) var<storage, read_write> partial_out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let rows = params[0];
    let chunk = params[1];
    let j = gid.x;
    let c = gid.y;
    if (j >= D) {
        return;
    }
    let first = c * chunk;
    let last = min(first + chunk, rows);
    var dgamma = 0.0;
    var dbeta = 0.0;
    for (var r = first; r < last; r++) {
        let gr = f32(g[r * D + j]);
        dgamma += gr * (x[r * D + j] - stats[2u * r]) * stats[2u * r + 1u];
        dbeta += gr;
    }
    partial_out[(2u * c) * D + j] = dgamma;
    partial_out[(2u * c + 1u) * D + j] = dbeta;
}
