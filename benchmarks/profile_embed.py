"""Profile `Embedder.embed` with cProfile and print where the time goes.

    python benchmarks/profile_embed.py IMAGE [--model M] [--threads N] [--runs 50]

IMAGE is a file, or ``frame`` for a 480x640 array made from ``--photo`` as
`edgeembed bench` makes its frame, or ``input`` for that array at the model's input size.
Time spent inside ``invoke()`` shows as one C call; the Python-side steps around it
(decode, resize, quantisation table, normalisation) show individually.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import numpy as np
from PIL import Image

from edgeembed import Embedder
from edgeembed.bench_photos import SMALL_SIZE, crop_to_aspect, input_array


def main() -> None:
    """Parse the arguments, embed the image `--runs` times under cProfile and print the top calls."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="an image file, or 'frame' or 'input' (with --photo)")
    parser.add_argument("--photo", help="the photo that 'frame' and 'input' are made from")
    parser.add_argument("--model", default=None, help="the model (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads")
    parser.add_argument("--runs", type=int, default=50, help="profiled calls (default: 50)")
    parser.add_argument("--top", type=int, default=15, help="rows to print (default: 15)")
    args = parser.parse_args()

    embedder = Embedder(args.model, num_threads=args.threads)
    image = args.image
    if image in ("frame", "input"):
        if not args.photo:
            parser.error(f"'{image}' needs --photo FILE")
        with Image.open(args.photo) as photo:
            frame = np.asarray(crop_to_aspect(photo.convert("RGB"), *SMALL_SIZE).resize(SMALL_SIZE))
        image = frame if args.image == "frame" else input_array(frame, embedder.preprocess.input_size)

    for _ in range(5):
        embedder.embed(image)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.runs):
        embedder.embed(image)
    profiler.disable()

    report = io.StringIO()
    stats = pstats.Stats(profiler, stream=report).sort_stats("cumulative")
    stats.print_stats(args.top)
    print(f"{args.runs} calls of Embedder.embed({args.image})")
    print(report.getvalue())


if __name__ == "__main__":
    main()
