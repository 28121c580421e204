// Shared by the three flash-attention kernels (forward, dQ, dK/dV).
//
// The host prepends the constants chosen from the adapter's limits:
//   DH  the head dimension (a multiple of 4), DV = DH / 4 the vec4s per row
//   BC  rows of K/V (or Q/dO) held in workgroup memory per tile (a multiple of KB)
//   BR  invocations per workgroup, and rows (query rows, or key rows in dK/dV) per workgroup
//   SPLIT  lanes that share a group of SPLIT rows (1, 2 or 4), DQ = DV / SPLIT: lane c of a group holds
//       vec4s c * DQ .. (c + 1) * DQ - 1 of each of the group's SPLIT rows, and the group adds its partial dot
//       products up with `lanes_sum` (subgroup shuffles; the identity for SPLIT = 1, one row per lane)
// Tensors are contiguous [B*H, N, DH] of `elem` (f32, or f16 where the adapter has shader-f16; the
// host prepends the alias), read and written as vec4; all arithmetic is f32. One workgroup covers BR rows of
// one (batch, head).
//
// Why it is fast on a GPU: each invocation keeps its rows in registers as vec4s and walks the tile KB keys at
// a time, so every vec4 read from workgroup memory (the same address for every group of the workgroup: a
// broadcast) feeds 4 multiply-adds for each of the lane's SPLIT rows, and the softmax bookkeeping happens once
// per KB keys. Reads from workgroup memory, not arithmetic, bound one row per lane (4 multiply-adds a read);
// SPLIT = 4 makes it 16 for the same registers, at the cost of two shuffles per 4 keys and row.
// Every loop over DQ and SPLIT has a constant trip count, so drivers unroll it and the row arrays stay in
// registers instead of spilling to memory. Subgroup operations must run in uniform control flow, so dead rows
// (past N) compute like live ones and only skip their writes.
// Every binding is read_write although most are only read: burn's memory pool packs many tensors into
// one wgpu buffer, and wgpu refuses a buffer bound read-only and read-write in the same dispatch.

@group(0) @binding(0) var<storage, read_write> q: array<vec4<elem>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<elem>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<elem>>;
// [B, N]: 1.0 where the key is padding and may not be attended to.
@group(0) @binding(3) var<storage, read_write> key_pad: array<f32>;
// [0] N, [1] heads, [2] rule, [3] prefix length, [4] softmax scale (f32 bits), [5] B*H*N.
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

const RULE_ALL: u32 = 0u;
const RULE_CAUSAL: u32 = 1u;
// Causal, except that queries inside the first `prefix` tokens also see later prefix tokens.
const RULE_PREFIX: u32 = 2u;
// The score of a masked pair: finite, so max() and exp() never meet inf - inf.
const MASKED: f32 = -3.0e38;
// Keys (or queries, in dK/dV) handled together in registers: one vec4 of scores.
const KB: u32 = 4u;

fn seq_len() -> u32 { return params[0]; }
fn batch_of(bh: u32) -> u32 { return bh / params[1]; }
fn softmax_scale() -> f32 { return bitcast<f32>(params[4]); }
// Offset of the second half of the stats (D) and of dV in the dK/dV output.
fn half_offset() -> u32 { return params[5]; }

// May query i attend to key j under the rule (key padding aside)?
fn allowed(i: u32, j: u32) -> bool {
    let rule = params[2];
    let p = params[3];
    return rule == RULE_ALL || j <= i || (rule == RULE_PREFIX && i < p && j < p);
}

fn key_open(b: u32, j: u32) -> bool {
    return key_pad[b * params[0] + j] == 0.0;
}

// The streamed operands in workgroup memory, BC rows of DV vec4s each: K at 0 and V at BC * DV in the
// forward and dQ kernels; Q (scaled) and dO in dK/dV.
var<workgroup> tile: array<vec4<f32>, 2u * BC * DV>;

// The tile rows r .. r + 3 of the operand at `base`, vec4 column d, as a matrix's columns: for a row share
// `a`, `a * rows` is the 4 dot products and `rows * w` the sum over c of w[c] * row r + c.
fn tile4(base: u32, r: u32, d: u32) -> mat4x4<f32> {
    let at = base + r * DV + d;
    return mat4x4(tile[at], tile[at + DV], tile[at + 2u * DV], tile[at + 3u * DV]);
}

// `allowed` for query i and the KB keys j0 .. j0 + 3.
fn allowed4(i: u32, j0: u32) -> vec4<bool> {
    return vec4(allowed(i, j0), allowed(i, j0 + 1u), allowed(i, j0 + 2u), allowed(i, j0 + 3u));
}

// `allowed` for the KB queries i0 .. i0 + 3 and key j.
fn allowed4_queries(i0: u32, j: u32) -> vec4<bool> {
    return vec4(allowed(i0, j), allowed(i0 + 1u, j), allowed(i0 + 2u, j), allowed(i0 + 3u, j));
}


// One past the last key any query of rows [row0, row0 + BR) may see. Uniform across the workgroup,
// so causal workgroups skip the tiles above the diagonal without breaking barrier uniformity.
fn key_end(row0: u32) -> u32 {
    let n = params[0];
    let rule = params[2];
    if (rule == RULE_ALL) {
        return n;
    }
    var end = min(n, row0 + BR);
    if (rule == RULE_PREFIX && row0 < params[3]) {
        end = max(end, min(n, params[3]));
    }
    return end;
}

// Loop bounds that enclose barriers must be uniform across the workgroup. The params sit in a
// read_write buffer, which WGSL's uniformity analysis counts as non-uniform (Chrome's Tint enforces it),
// so the bounds are handed through workgroupUniformLoad, whose result is uniform by definition.
var<workgroup> bound_start: u32;
var<workgroup> bound_end: u32;

fn uniform_bounds(lane: u32, start: u32, end: u32) -> vec2<u32> {
    if (lane == 0u) {
        bound_start = start;
        bound_end = end;
    }
    return vec2(workgroupUniformLoad(&bound_start), workgroupUniformLoad(&bound_end));
}

// The first query that may see any key of [col0, col0 + BR).
fn query_start(col0: u32) -> u32 {
    let rule = params[2];
    if (rule == RULE_ALL || (rule == RULE_PREFIX && col0 < params[3])) {
        return 0u;
    }
    return col0;
}
