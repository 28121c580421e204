"""PyTorch reference of the ov3 model and losses (DESIGN §2-3), for the step-time baseline.

Same presets, same initialisation scheme as ov3-core (xavier-uniform linears and patch conv, biases drawn
with the same bound as burn's initializer, the residual output projections of the blocks at zero except in the text encoder,
LayerNorm 1/0, token embeddings N(0, 0.02), text positions
N(0, 0.01), bias-free projections N(0, 0.02), logit scale ln(1/0.07)), the same random workload as
`ov3 bench step` (random latents, byte-tokenized captions) and AdamW (0.9, 0.95, wd 0.2 on matrices) with
global grad-norm clipping 1.0.

    python bench/torch_ref.py --preset tiny --batch 8 --res 128 --threads 2 [--context 24]
    python bench/torch_ref.py --preset base --batch 32 --res 256 --device cuda [--amp]
prints one JSON line like `ov3 bench step`. `--amp`: bf16 autocast (f32 weights and optimiser state).
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # (width, depth, heads) for encoder, decoder, text encoder, text decoder; embed dim
    "tiny": ((192, 6, 3), (192, 4, 3), (128, 4, 2), (128, 4, 2), 128),
    "small": ((384, 12, 6), (384, 8, 6), (256, 6, 4), (256, 6, 4), 256),
    "base": ((768, 12, 12), (768, 12, 12), (512, 12, 8), (512, 12, 8), 512),
    "large": ((1024, 24, 16), (768, 12, 12), (768, 12, 12), (768, 12, 12), 768),
}
VOCAB, CONTEXT, BOS, EOS, PAD, LATENT_CH, TAU = 259, 80, 256, 257, 258, 16, 0.5


def xavier_linear(d_in, d_out, bias=True):
    lin = nn.Linear(d_in, d_out, bias=bias)
    bound = math.sqrt(6.0 / (d_in + d_out))
    nn.init.uniform_(lin.weight, -bound, bound)
    if bias:
        nn.init.uniform_(lin.bias, -bound, bound)
    return lin


def projection(d_in, d_out):
    lin = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(lin.weight, 0.0, 0.02)
    return lin


class Block(nn.Module):
    def __init__(self, w, heads, identity=True):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(w, eps=1e-6), nn.LayerNorm(w, eps=1e-6)
        self.qkv, self.proj = xavier_linear(w, 3 * w), xavier_linear(w, w)
        self.fc1, self.fc2 = xavier_linear(w, 4 * w), xavier_linear(4 * w, w)
        for lin in (self.proj, self.fc2) if identity else ():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def attn(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The same unfused matmul-softmax-matmul as ov3's reference path.
        logits = q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5
        if mask is not None:
            logits = logits.masked_fill(mask, -1e9)
        return self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def sincos_2d(h, w, dim):
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (cols.reshape(-1, 1), rows.reshape(-1, 1)):
        parts += [torch.sin(pos * omega), torch.cos(pos * omega)]
    return torch.cat(parts, 1).float()


class TokenInput(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, w)
        nn.init.normal_(self.token_embedding.weight, 0.0, 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, w) * 0.01)

    def forward(self, tokens):
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]


class Ov3(nn.Module):
    def __init__(self, preset):
        super().__init__()
        (ew, ed, eh), (dw, dd, dh), (tw, td, th), (cw, cd, ch), embed = PRESETS[preset]
        self.patch = nn.Conv2d(LATENT_CH, ew, 2, 2, bias=False)
        fan_in, fan_out = LATENT_CH * 4, ew * 4
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(self.patch.weight, -bound, bound)
        self.enc = nn.ModuleList(Block(ew, eh) for _ in range(ed))
        self.decoder_embed = xavier_linear(ew, dw)
        self.dec = nn.ModuleList(Block(dw, dh) for _ in range(dd))
        self.dec_norm, self.pred = nn.LayerNorm(dw, eps=1e-6), xavier_linear(dw, 4 * LATENT_CH)
        self.img_norm, self.img_proj = nn.LayerNorm(ew, eps=1e-6), projection(ew, embed)
        self.txt_in = TokenInput(tw)
        self.txt = nn.ModuleList(Block(tw, th, identity=False) for _ in range(td))
        self.txt_norm, self.txt_proj = nn.LayerNorm(tw, eps=1e-6), projection(tw, embed)
        self.visual_proj = xavier_linear(ew, cw)
        self.cap_in = TokenInput(cw)
        self.cap = nn.ModuleList(Block(cw, ch) for _ in range(cd))
        self.cap_norm, self.lm_head = nn.LayerNorm(cw, eps=1e-6), projection(cw, VOCAB)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))

    def losses(self, latents, tokens, w_rec=0.5, w_und=1.0, beta=0.4, alpha=1.0):
        b, _, h, w = latents.shape
        x = self.patch(latents).flatten(2).transpose(1, 2)
        x = x + sincos_2d(h // 2, w // 2, x.shape[-1])
        for blk in self.enc:
            x = blk(x)
        z_u = x
        # eq. 3 and the decoder
        sigma = torch.rand(b, 1, 1) * TAU
        y = self.decoder_embed(z_u + sigma * torch.randn_like(z_u))
        y = y + sincos_2d(h // 2, w // 2, y.shape[-1])
        for blk in self.dec:
            y = blk(y)
        y = self.pred(self.dec_norm(y))
        z_hat = y.reshape(b, h // 2, w // 2, 2, 2, LATENT_CH).permute(0, 5, 1, 3, 2, 4).reshape(b, LATENT_CH, h, w)
        rec = beta * (latents - z_hat).abs().mean()  # eq. 4 without a pixel path, as `ov3 bench step`
        # contrastive
        img = self.img_proj(self.img_norm(z_u.mean(1)))
        pad = (tokens == PAD)[:, None, None, :]
        t = self.txt_in(tokens)
        for blk in self.txt:
            t = blk(t, pad)
        eos = (tokens == EOS).int().argmax(1)
        txt = self.txt_proj(self.txt_norm(t[torch.arange(b), eos]))
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
        labels = torch.arange(b)
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        # captioning, prefix fusion
        n_img = z_u.shape[1]
        s = torch.cat([self.visual_proj(z_u), self.cap_in(tokens)], 1)
        n = s.shape[1]
        idx = torch.arange(n)
        mask = (idx[None, :] > idx[:, None]) & ~((idx[:, None] < n_img) & (idx[None, :] < n_img))
        for blk in self.cap:
            s = blk(s, mask)
        cap_logits = self.lm_head(self.cap_norm(s[:, n_img:]))
        caption = F.cross_entropy(cap_logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), ignore_index=PAD)
        und = caption + alpha * contrastive
        return w_rec * rec + w_und * und


def caption(i):
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "star", "ring", "cross"]
    n = i // (len(colours) * len(shapes)) + 1
    return f"{n} {colours[i % len(colours)]} {shapes[(i // len(colours)) % len(shapes)]} on a grey background"


def tokens_for(b):
    rows = []
    for i in range(b):
        ids = [BOS] + list(caption(i).encode())[: CONTEXT - 2] + [EOS]
        rows.append(ids + [PAD] * (CONTEXT - len(ids)))
    return torch.tensor(rows)


def main():
    global CONTEXT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the forward pass")
    ap.add_argument("--context", type=int, default=CONTEXT, help="caption tokens (24: the quick recipe's)")
    args = ap.parse_args()
    if args.context < 4:
        ap.error("--context must be at least 4 tokens")
    CONTEXT = args.context
    torch.set_num_threads(args.threads)
    # Every tensor the model and the workload create lands on the device.
    torch.set_default_device(args.device)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    model = Ov3(args.preset)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    side = args.res // 8
    latents = torch.randn(args.batch, LATENT_CH, side, side)
    tokens = tokens_for(args.batch)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=args.amp):
            loss = model.losses(latents, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    if cuda:
        peak_mib, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
        adapter = f"torch {torch.__version__} {torch.cuda.get_device_name()}"
    else:
        peak_mib, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
        adapter = f"torch {torch.__version__}"
    print(json.dumps({"bench": "step", "impl": "pytorch", "backend": "cuda" if cuda else "cpu", "adapter": adapter,
                      "precision": "bf16 autocast" if args.amp else "f32",
                      "preset": args.preset, "batch": args.batch, "res": args.res, "context": CONTEXT,
                      "ms_per_step": round(median * 1e3, 1),
                      "images_per_s": round(args.batch / median, 2), "peak_mib": round(peak_mib),
                      "peak_kind": peak_kind, "threads": args.threads}))


if __name__ == "__main__":
    main()
