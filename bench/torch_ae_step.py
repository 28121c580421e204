"""Time one training step of the embedded autoencoder (tools/train_ae.py's network and objective) in PyTorch,
f32 against bf16 autocast, default layout against channels-last, in one run: which of the four the recipe
should use on this machine (docs/PERFORMANCE.md, "Embedded autoencoder").

    /tmp/ref/bin/python bench/torch_ae_step.py --threads 2 [--width 48 --batch 16 64 --crop 64 --device cpu]

Prints one JSON line per setting (ms per step, crops per second) and, per batch, each setting's speed-up over
f32 in the default layout measured in the same run. bf16 pays only where the CPU has bf16 units (AMX or
AVX512-BF16, `grep -o 'amx_bf16\\|avx512_bf16' /proc/cpuinfo`); elsewhere expect it to be slower.
"""
import argparse
import importlib.util
import json
import os
import time

import torch

spec = importlib.util.spec_from_file_location("train_ae", os.path.join(os.path.dirname(__file__), "..", "tools", "train_ae.py"))
train_ae = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_ae)


def time_step(width, batch, crop, bf16, channels_last, device, repeats):
    torch.manual_seed(0)
    enc, dec = train_ae.encoder(width).to(device), train_ae.decoder(width).to(device)
    x = torch.rand(batch, 3, crop, crop, device=device)
    if channels_last:
        enc, dec = enc.to(memory_format=torch.channels_last), dec.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(dec.parameters()), lr=1e-4, betas=(0.9, 0.99))

    def step():  # the recipe's step: L1(x, x_hat) + 1e-3 * mean(z^2), AdamW
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = enc(x)
            loss = (dec(z).float() - x).abs().mean() + 1e-3 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # waits for the device

    step(), step()  # warm-up: oneDNN / cuDNN pick their kernels
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for batch in a.batch:
        base = None
        for bf16 in (False, True):
            for channels_last in (False, True):
                s = time_step(a.width, batch, a.crop, bf16, channels_last, a.device, a.repeats)
                base = base or s
                print(json.dumps({"width": a.width, "batch": batch, "crop": a.crop, "device": a.device,
                                  "threads": a.threads, "dtype": "bf16-autocast" if bf16 else "f32",
                                  "layout": "channels_last" if channels_last else "contiguous",
                                  "ms_per_step": round(s * 1e3, 1), "crops_per_s": round(batch / s, 1),
                                  "speedup_vs_f32_contiguous": round(base / s, 2)}), flush=True)


if __name__ == "__main__":
    main()
