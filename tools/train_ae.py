#!/usr/bin/env python3
"""Train ov3's embedded autoencoder (TAEF1's architecture at a chosen width) with PyTorch on the CPU.

Why PyTorch: `ov3 train-vae` trains the same network with the same objective, but burn's CPU convolutions
run it ~4 s per step of batch 8 at 64 px on this project's 2-core machine (docs/PERFORMANCE.md); the
photographs goal of issue 23 needs tens of thousands of steps. This script is the recipe of the shipped
weights; ov3 loads its output like any TAEF1 file, and `ov3 train-vae --init FILE` continues it in Rust.

Objective (as `ov3 train-vae`): L1(x, x_hat) + 1e-3 * mean(z^2), images in [0, 1] in and out, AdamW
(beta2 0.99, no weight decay), cosine decay to 10% over the time budget.

Data: folders of name.png (+ name.txt, ignored here), e.g. DIR/train from `ov3 data prepare real` and world
scenes from `ov3 datagen`. Each step draws random square crops (45-100% of the shorter side, flipped half
the time), resized to --res with antialiasing, then random --crop px windows; half of them with their RGB
channels permuted and a third with their saturation scaled (--no-colour-jitter turns it off), plus a share of
plain colours and gradients (--plain-share).

Speed: `--bf16` (bf16 autocast, f32 master weights and AdamW state; channels-last always) runs 3.4-4.2x the
crops per second of f32 on a CPU with AMX, like this project's (`bench/torch_ae_step.py` measures the four
settings in one run; docs/PERFORMANCE.md, "Embedded autoencoder").

Output: safetensors in TAEF1's original layout (`encoder.{i}.conv.{j}.weight`, ...), stored as f16 or f32,
with the `ov3_embedded_autoencoder` note that ov3 reads as "already in the tokenizer's convention".

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch safetensors numpy pillow
    /tmp/ref/bin/python tools/train_ae.py --data /tmp/real/train --world /tmp/world --minutes 60 \\
        --width 64 --out /tmp/ae.safetensors --heldout /tmp/real/heldout
"""

import argparse
import glob
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class Block(nn.Module):
    """TAESD's block: relu(conv(relu(conv(relu(conv(x))))) + x), 3x3 convs with bias."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.skip = nn.Identity()

    def forward(self, x):
        return F.relu(self.conv(x) + self.skip(x))


class Clamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3


def encoder(c, latent=16):
    down = lambda: nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), Block(c),
                         down(), Block(c), Block(c), Block(c),
                         down(), Block(c), Block(c), Block(c),
                         down(), Block(c), Block(c), Block(c),
                         nn.Conv2d(c, latent, 3, padding=1))


def decoder(c, latent=16):
    up = lambda: [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1, bias=False)]
    return nn.Sequential(Clamp(), nn.Conv2d(latent, c, 3, padding=1), nn.ReLU(),
                         Block(c), Block(c), Block(c), *up(),
                         Block(c), Block(c), Block(c), *up(),
                         Block(c), Block(c), Block(c), *up(),
                         Block(c), nn.Conv2d(c, 3, 3, padding=1))


def image_files(path):
    return sorted(glob.glob(os.path.join(path, "*.png")) + glob.glob(os.path.join(path, "*.jpg")))


def load_folder(path, limit=None):
    files = image_files(path)[:limit]
    if not files:
        raise SystemExit(f"{path}: no .png or .jpg files")
    return [np.array(Image.open(f).convert("RGB")) for f in files]


def random_crops(images, n, res, crop, g, jitter=False):
    """n crops: a random square of 45-100% of the shorter side, resized to res, a random crop x crop window."""
    out = []
    for _ in range(n):
        img = images[g.integers(len(images))]
        h, w, _ = img.shape
        side = int(min(h, w) * g.uniform(0.45, 1.0))
        y, x = g.integers(h - side + 1), g.integers(w - side + 1)
        t = torch.from_numpy(img[y:y + side, x:x + side]).permute(2, 0, 1).float()[None] / 255
        t = F.interpolate(t, size=(res, res), mode="bilinear", antialias=True, align_corners=False) if side != res else t
        cy, cx = g.integers(res - crop + 1), g.integers(res - crop + 1)
        t = t[..., cy:cy + crop, cx:cx + crop]
        if g.random() < 0.5:
            t = t.flip(-1)
        out.append(colour_jitter(t, g) if jitter else t)
    return torch.cat(out).clamp(0, 1)


def colour_jitter(t, g):
    """Half the crops get their RGB channels permuted, a third their saturation scaled by 0.5-1.8: without
    it the network desaturates colours it saw rarely (a plain green or purple came back grey)."""
    if g.random() < 0.5:
        t = t[:, g.permutation(3)]
    if g.random() < 0.33:
        grey = t.mean(1, keepdim=True)
        t = grey + g.uniform(0.5, 1.8) * (t - grey)
    return t


def plain_crops(n, crop, g):
    """n crops of a plain colour or a linear gradient between two random colours (saturated ones included)."""
    out = []
    for _ in range(n):
        a, b = torch.tensor(g.random(3)).float(), torch.tensor(g.random(3)).float()
        if g.random() < 0.5:
            b = a
        angle = g.uniform(0, 2 * math.pi)
        ramp = torch.linspace(0, 1, crop)
        w = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]).clamp(0, 1)
        w = (w - w.min()) / (w.max() - w.min() + 1e-6)
        out.append((a[:, None, None] * (1 - w) + b[:, None, None] * w)[None])
    return torch.cat(out)


def center(images, res):
    out = []
    for img in images:
        h, w, _ = img.shape
        s = min(h, w)
        t = torch.from_numpy(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]).permute(2, 0, 1)
        t = t.float()[None] / 255
        out.append(F.interpolate(t, size=(res, res), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1))
    return torch.cat(out)


def psnr(x, y):
    mse = ((x - y.clamp(0, 1)) ** 2).flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-12))).tolist()


def block8(x):
    return F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="nearest")


def state(enc, dec, dtype):
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    return {k: v.detach().cpu().to(dtype).contiguous() for k, v in sd.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of real training images")
    p.add_argument("--world", help="folder of world scenes (ov3 datagen)")
    p.add_argument("--world-share", type=float, default=0.25)
    p.add_argument("--plain-share", type=float, default=0.0625, help="share of plain colours and gradients")
    p.add_argument("--colour-jitter", action=argparse.BooleanOptionalAction, default=True,
                   help="permute channels / scale saturation of some crops")
    p.add_argument("--heldout", help="folder of held-out images, scored at the end against 8x block averaging")
    p.add_argument("--out", required=True)
    p.add_argument("--init", help="continue from a file this script or ov3 wrote")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0,
                   help="steps of linear learning-rate warm-up (fresh AdamW moments jolt a continued network)")
    p.add_argument("--f16", action="store_true", help="store the weights as f16 (half the file)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a lent GPU machine (bench/gpu_ae.sh)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (f32 master weights and AdamW state): 3.4-4.2x the crops per second on a CPU "
                        "with AMX (docs/PERFORMANCE.md), not for CPUs without bf16 units")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    g = np.random.default_rng(a.seed)

    sd = load_file(a.init) if a.init else None
    if sd is not None:
        a.width = sd["encoder.0.weight"].shape[0]  # the file's width, whatever --width says
    enc, dec = encoder(a.width), decoder(a.width)
    if sd is not None:
        enc.load_state_dict({k[8:]: v.float() for k, v in sd.items() if k.startswith("encoder.")})
        dec.load_state_dict({k[8:]: v.float() for k, v in sd.items() if k.startswith("decoder.")})
    # channels-last: oneDNN's convolutions (bf16 above all) run without layout conversions.
    enc = enc.to(a.device, memory_format=torch.channels_last)
    dec = dec.to(a.device, memory_format=torch.channels_last)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    real = load_folder(a.data)
    world = load_folder(a.world) if a.world else []
    n_world = round(a.batch * a.world_share) if world else 0
    n_plain = round(a.batch * a.plain_share)
    print(f"{len(real)} real + {len(world)} world images; width {a.width}, "
          f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters; batch {a.batch} ({n_world} world, {n_plain} plain)", flush=True)

    start, step, last = time.time(), 0, 0.0
    while step < a.steps and time.time() - start < a.minutes * 60:
        progress = min((time.time() - start) / (a.minutes * 60), 1.0)
        lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))) * min(1.0, (step + 1) / (a.warmup + 1))
        for group in opt.param_groups:
            group["lr"] = lr
        parts = [random_crops(real, a.batch - n_world - n_plain, a.res, a.crop, g, jitter=a.colour_jitter)]
        if n_world:
            parts.append(random_crops(world, n_world, a.res, a.crop, g, jitter=a.colour_jitter))
        if n_plain:
            parts.append(plain_crops(n_plain, a.crop, g))
        x = torch.cat(parts).to(a.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            z = enc(x)
            loss = (dec(z).float() - x).abs().mean() + 1e-3 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        last = 0.98 * last + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 200 == 0:
            print(f"step {step} L1 {last:.4f} lr {lr:.1e} {time.time() - start:.0f} s", flush=True)
            save(enc, dec, a, step, start)
    save(enc, dec, a, step, start)
    print(f"wrote {a.out} after {step} steps ({(time.time() - start) / 60:.1f} min)", flush=True)

    if a.heldout:
        with torch.no_grad():
            files = image_files(a.heldout)
            x = center(load_folder(a.heldout), a.res)
            rec = torch.cat([dec(enc(x[i:i + 16].to(a.device))).cpu() for i in range(0, len(x), 16)])
            ours, naive = psnr(x, rec), psnr(x, block8(x))
            margins = [o - b for o, b in zip(ours, naive)]
            w = int(np.argmin(margins))
            print(f"{a.heldout}: PSNR {np.mean(ours):.2f} dB over {len(ours)} images at {a.res} px; "
                  f"8x block average {np.mean(naive):.2f} dB; worst margin {margins[w]:+.2f} dB "
                  f"({os.path.basename(files[w])}: {ours[w]:.2f} vs {naive[w]:.2f} dB)")


def save(enc, dec, a, step, start):
    note = (f"tools/train_ae.py (PyTorch {torch.__version__}): TAEF1 architecture, width {a.width}, {step} steps "
            f"of batch {a.batch} ({a.crop} px crops of {a.res} px) on {a.data}"
            f"{' + ' + a.world if a.world else ''} ({(time.time() - start) / 60:.1f} min, lr {a.lr:g}"
            f"{', world share ' + format(a.world_share, 'g') if a.world else ''}{', bf16 autocast' if a.bf16 else ''})"
            f"{', continued from ' + a.init if a.init else ''}")
    if a.init:  # the init file's own history, so the shipped file keeps its whole recipe
        with safe_open(a.init, "pt") as f:
            before = (f.metadata() or {}).get("ov3_embedded_autoencoder")
        note += f": {before}" if before else ""
    tmp = a.out + ".tmp"
    save_file(state(enc, dec, torch.float16 if a.f16 else torch.float32), tmp, metadata={"ov3_embedded_autoencoder": note})
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
