"""The crop path's resampling step: Pillow's Image.resize against our kernel, on real crops.

Usage: .venv/bin/python benchmarks/bench_resample.py [--root ../shared/data/imagenet-sample]
           [--limit 200] [--image-size 224] [--rounds 9] [--against OLD.c]

Each ImageNet-sample photo gets a random-resized crop, decoded as the crop path decodes it (the
DCT scale the crop allows, only the region); then each variant turns every crop into its
(size, size, 3) uint8 bicubic result, mirrored where the crop says: Pillow from a PIL image of
the decoded buffer (the conversion not timed), ours (`resnext.data.resample`) from the buffer.
`--against` adds another revision of `kernels/resample.c`, built the same way, e.g.
`git show REV:src/resnext/data/kernels/resample.c > /tmp/old.c`. Variants alternate in each
round; the per-round median time per image and the ratios to Pillow are recorded.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from PIL import Image

import bench_args
from resnext.data import resample
from resnext.speed.data_bench import decoded_crops, list_images
from resnext.speed.measure import interleaved, median_ratio
from resnext.speed.provenance import write_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def main() -> int:
    parser = bench_args.parser(__doc__, image_size=224, rounds=9)
    parser.add_argument("--root", type=Path, default=SHARED, help="folder of JPEG images")
    parser.add_argument("--limit", type=int, default=200, help="photos (one crop each)")
    parser.add_argument("--against", type=Path, help="another resample.c to time alongside")
    args = parser.parse_args()
    if resample.unavailable_reason() is not None:
        print(f"our resampler cannot run here: {resample.unavailable_reason()}")
        return 1
    if not args.root.is_dir():
        print(f"--root {args.root}: not a folder (the ImageNet sample lives in ../shared)")
        return 1
    if args.against is not None and not args.against.is_file():
        print(f"--against {args.against}: no such file (expected a resample.c to build)")
        return 1
    size = (args.image_size, args.image_size)
    crops = decoded_crops(list_images(args.root, args.limit), args.image_size)
    pil = [Image.fromarray(canvas) for canvas, _, _ in crops]

    def pillow() -> None:
        for img, (_, box, flip) in zip(pil, crops, strict=True):
            out = img.resize(size, Image.Resampling.BICUBIC, box=box)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            np.asarray(out)

    def ours(source: Path) -> None:
        for canvas, box, flip in crops:
            resample.resize_box(canvas, box, size, "bicubic", flip, source=source)

    variants = {"pillow": pillow, "ours": lambda: ours(resample.SOURCE)}
    if args.against is not None:
        variants["against"] = lambda: ours(args.against.resolve())
    # one untimed call each first: builds, first touches
    runs = {name: (fn, len(crops)) for name, fn in variants.items()}
    timings = interleaved(runs, rounds=args.rounds, iters=1, warmup=1)
    ms = {name: [1e3 * s / len(crops) for s in t.seconds] for name, t in timings.items()}
    median = {name: statistics.median(t) for name, t in ms.items()}
    speedup = {name: median_ratio(ms["pillow"], ms[name]) for name in variants}
    boxes = np.array([(b[2] - b[0], b[3] - b[1]) for _, b, _ in crops])
    results = {
        "crops": len(crops),
        "box_width_height_median": np.median(boxes, 0).tolist(),
        "ms_per_image_median": median,
        "ms_per_image_rounds": ms,
        "speedup_over_pillow_per_round_median": speedup,
    }
    if args.against is not None:
        results["ours_over_against_speedup_per_round_median"] = median_ratio(
            ms["against"], ms["ours"]
        )
    config = {**vars(args), "root": str(args.root), "against": str(args.against)}
    for name in variants:
        print(f"{name}: {median[name]:.3f} ms per image, {speedup[name]:.2f}× Pillow per round")
    if args.against is not None:
        print(
            f"ours ÷ against: {results['ours_over_against_speedup_per_round_median']:.2f}× faster"
        )
    print(f"results: {write_results(args.out, 'bench-resample', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
