"""PIL reference for `ov3 bench data`: decode + resize (shorter side, Lanczos) + center crop, with N workers.

    python bench/data_ref.py DIR --res 256 --threads 2
Files are read into memory first, as ov3 does, so both time decoding and resizing only.
"""
import argparse
import io
import json
import os
import time
from multiprocessing import Pool

from PIL import Image


def work(blob_and_res):
    blob, res = blob_and_res
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = img.size
    s = res / min(w, h)
    nw, nh = max(res, round(w * s)), max(res, round(h * s))
    img = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - res) // 2, (nh - res) // 2
    return img.crop((left, top, left + res, top + res)).size == (res, res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    files = sorted(f for f in os.listdir(args.dir) if not f.endswith(".txt"))
    blobs = [(open(os.path.join(args.dir, f), "rb").read(), args.res) for f in files]
    with Pool(args.threads) as pool:
        pool.map(work, blobs[: args.threads])  # start the workers before timing
        start = time.perf_counter()
        ok = sum(pool.map(work, blobs, chunksize=8))
        secs = time.perf_counter() - start
    print(json.dumps({"bench": "data", "impl": "pil", "threads": args.threads, "images": ok, "res": args.res,
                      "images_per_s": round(ok / secs, 1)}))


if __name__ == "__main__":
    main()
