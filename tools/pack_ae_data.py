#!/usr/bin/env python3
"""Pack the autoencoder's training images small enough to travel to a lent GPU machine with the repository
(the device tool carries at most 64 MiB in all, and the tracked tree is ~38 MB of it).

Every image of each SRC folder is re-encoded as JPEG (quality --quality) with its shorter side at most --side
pixels, into OUT/<name of SRC>/; `tools/train_ae.py --data OUT/train --world OUT/world` reads them there. The
shrink costs the training crops some detail (a crop of 45% of a 160 px side is upscaled to 128 px), which is
why this is for GPU sessions only; the CPU recipe reads the full-size folders.

    python3 tools/pack_ae_data.py --out .gpu-ae /tmp/real/train /tmp/world --limit 0 1200 --max-mb 22

--max-mb keeps the whole pack at about that many MB (10^6 bytes; within ~2%) by leaving out evenly spaced images of every
folder, the same share of each, and says how many.
"""

import argparse
import glob
import os

from PIL import Image


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="+", help="folders of .png/.jpg images")
    p.add_argument("--out", required=True)
    p.add_argument("--side", type=int, default=160)
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--limit", type=int, nargs="*", default=[], help="images per folder (0 = all), in order")
    p.add_argument("--max-mb", type=float, default=0, help="leave out evenly spaced images to stay near this")
    a = p.parse_args()
    if a.max_mb < 0:
        p.error(f"--max-mb {a.max_mb:g}: must be positive (0 = no limit); nothing fits beside a tree this large")
    total = 0
    packed = []
    for i, src in enumerate(a.src):
        files = sorted(glob.glob(os.path.join(src, "*.png")) + glob.glob(os.path.join(src, "*.jpg")))
        limit = a.limit[i] if i < len(a.limit) and a.limit[i] > 0 else len(files)
        dst = os.path.join(a.out, os.path.basename(os.path.normpath(src)))
        os.makedirs(dst, exist_ok=True)
        for f in files[:limit]:
            im = Image.open(f).convert("RGB")
            if min(im.size) > a.side:
                r = a.side / min(im.size)
                im = im.resize((round(im.width * r), round(im.height * r)), Image.LANCZOS)
            out = os.path.join(dst, os.path.splitext(os.path.basename(f))[0] + ".jpg")
            im.save(out, "JPEG", quality=a.quality)
            total += os.path.getsize(out)
        print(f"{src}: {limit} images -> {dst}")
        packed.append(dst)
    if a.max_mb and total > a.max_mb * 1e6:
        keep = a.max_mb * 1e6 / total * 0.98  # a little under: the kept images' sizes vary
        total = 0
        for dst in packed:
            files = sorted(os.listdir(dst))
            kept = {int(i / keep) for i in range(int(len(files) * keep))}
            for j, f in enumerate(files):
                if j in kept:
                    total += os.path.getsize(os.path.join(dst, f))
                else:
                    os.remove(os.path.join(dst, f))
            print(f"{dst}: kept {len(kept)} of {len(files)} images (--max-mb {a.max_mb:g})")
    print(f"{total / 1e6:.1f} MB in {a.out}")


if __name__ == "__main__":
    main()
