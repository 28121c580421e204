"""Convert the official LPIPS weights to the safetensors files `ov3 train/eval --lpips-trunk/--lpips-heads` read.

    python tools/lpips_weights.py --net vgg --out weights/   # needs torch, torchvision, lpips (PyPI)

Writes `<net>_trunk.safetensors` (torchvision's ImageNet VGG16 or AlexNet `features.*`, downloaded by
torchvision on first use) and `<net>_heads.safetensors` (the linear heads shipped inside the lpips package,
keys `lin{k}.model.1.weight`).
"""
import argparse
import pathlib

import lpips
import torch
import torchvision
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", choices=["vgg", "alex"], default="vgg")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trunk = torchvision.models.vgg16(weights="DEFAULT") if args.net == "vgg" else torchvision.models.alexnet(weights="DEFAULT")
    features = {k: v.contiguous() for k, v in trunk.state_dict().items() if k.startswith("features.")}
    save_file(features, args.out / f"{args.net}_trunk.safetensors")
    heads_pth = pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / f"{args.net}.pth"
    heads = {k: v.contiguous() for k, v in torch.load(heads_pth, map_location="cpu").items()}
    save_file(heads, args.out / f"{args.net}_heads.safetensors")
    print(f"wrote {args.out}/{args.net}_trunk.safetensors and {args.out}/{args.net}_heads.safetensors")


if __name__ == "__main__":
    main()
