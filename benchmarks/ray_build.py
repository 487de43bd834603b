"""Compare ``edgeembed index build`` in one process with ``--engine ray`` on the same photos.

    python benchmarks/ray_build.py [--photos DIR] [--synthetic 5000] [--workers N]
                                   [--ray-address ADDRESS --workdir SHARED_DIR] [--json FILE]

Three catalogues are built with both engines:

- ``tiny``: the first ``--tiny`` photos (default 8), whose build time is almost all
  fixed cost (starting Python, Ray and the actors, loading the model);
- ``photos``: every image under ``--photos`` (by default the shared datasets,
  flowers17 and coil100: 736 real photos);
- ``synthetic``: ``--synthetic`` JPEGs of 640x480, each a random crop of one of those
  photos (seeded), written to a temporary folder like a catalogue of decoded frames.

Each build runs the real command line in a subprocess. The script reports wall time,
images per second, the peak memory of the whole process tree (the sum of PSS, so that
Ray's shared object store counts once), and for Ray its start-up time as the command
reports it. A linear fit of wall time over the three catalogue sizes gives each engine a
fixed cost and a cost per image, and from them the catalogue size from which Ray is
faster on this machine. Finally it checks that both engines wrote the same vectors and
the same top-5 search results. Memory is measured on this machine only: with
``--ray-address`` the actors on other nodes are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ROOT.parent / "shared" / "assets" / "datasets"
FRAME_SIZE = (640, 480)
SAMPLE_SECONDS = 0.2
QUERIES = 50

from edgeembed.gallery import Gallery  # noqa: E402
from edgeembed.preprocess import list_images, load_image  # noqa: E402


def process_tree(root: int) -> list[int]:
    """Return `root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def pss_mb(pid: int) -> float:
    """Return a process's proportional set size in MiB, or 0 when it has exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemory:
    """Samples the summed PSS of a process tree in a thread and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            total = sum(pss_mb(pid) for pid in process_tree(self.pid))
            self.peak_mb = max(self.peak_mb, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def make_synthetic(photos: list[Path], folder: Path, count: int, seed: int = 0) -> float:
    """Write `count` 640x480 JPEGs cropped from `photos`, 500 per subfolder; return the seconds taken."""
    started = time.perf_counter()
    generator = random.Random(seed)
    for number in range(count):
        image = load_image(photos[number % len(photos)])
        width, height = image.size
        side = generator.uniform(0.5, 1.0)
        crop_width, crop_height = max(1, round(width * side)), max(1, round(height * side))
        left = generator.randint(0, width - crop_width)
        upper = generator.randint(0, height - crop_height)
        frame = image.crop((left, upper, left + crop_width, upper + crop_height)).resize(
            FRAME_SIZE, Image.Resampling.BILINEAR)
        if generator.random() < 0.5:
            frame = frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = folder / f"part{number // 500:03d}" / f"frame{number:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.save(target, quality=85)
    return time.perf_counter() - started


def run_build(source: Path, out: Path, engine: str, args: argparse.Namespace) -> dict:
    """Run ``edgeembed index build`` in a subprocess and measure it."""
    command = [sys.executable, "-m", "edgeembed", "index", "build", str(source), "--out", str(out)]
    if args.model:
        command += ["--model", args.model]
    if engine == "ray":
        command += ["--engine", "ray"]
        if args.workers:
            command += ["--workers", str(args.workers)]
        if args.ray_address:
            command += ["--ray-address", args.ray_address]

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    peak = memory.stop()
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed with code {process.returncode}:\n{stderr}")

    indexed = re.search(r"indexed (\d+) of (\d+) images", stderr)
    record = {"engine": engine, "images": int(indexed.group(2)) if indexed else None,
              "indexed": int(indexed.group(1)) if indexed else None, "wall_s": round(seconds, 2),
              "images_per_s": round(int(indexed.group(2)) / seconds, 1) if indexed else None,
              "peak_pss_mb": round(peak, 1)}
    timing = re.search(r"ray: start-up ([\d.]+) s, first results after ([\d.]+) s, embedded \d+ images "
                       r"in ([\d.]+) s", stderr)
    if timing:
        record["ray_startup_s"] = float(timing.group(1))
        record["ray_first_results_s"] = float(timing.group(2))
        record["ray_embed_s"] = float(timing.group(3))
    return record


def compare(local: Path, ray: Path) -> dict:
    """Compare vectors and top-5 results of two galleries of the same photos."""
    one, other = Gallery.open(local), Gallery.open(ray)
    difference = float(np.abs(one.vectors() - other.vectors()).max())
    vectors = one.vectors()
    rows = np.linspace(0, len(vectors) - 1, min(QUERIES, len(vectors))).round().astype(int)
    same = sum([m.id for m in one.search(vectors[row], 5)] == [m.id for m in other.search(vectors[row], 5)]
               for row in rows)
    return {"max_abs_difference": difference, "same_top5": f"{same} of {len(rows)}"}


def fit(records: list[dict]) -> tuple[float, float]:
    """Fit wall time = fixed + per_image * images; return (fixed seconds, seconds per image)."""
    images = np.array([record["images"] for record in records], dtype=float)
    seconds = np.array([record["wall_s"] for record in records], dtype=float)
    per_image, fixed = np.polyfit(images, seconds, 1)
    return float(fixed), float(per_image)


def describe_machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    import ray

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
            "load_average_at_start": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of real photos")
    parser.add_argument("--tiny", type=int, default=8, help="photos in the tiny catalogue (default: 8)")
    parser.add_argument("--synthetic", type=int, default=5000, help="synthetic 640x480 JPEGs (default: 5000)")
    parser.add_argument("--workers", type=int, help="Ray embedding actors (default: one per CPU)")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local instance")
    parser.add_argument("--workdir", type=Path,
                        help="folder for the synthetic photos and galleries; on a cluster, a shared "
                             "folder that every node mounts at the same path (default: a temporary folder)")
    parser.add_argument("--model", help="TFLite embedder (default: the shipped model)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    photos = list_images([args.photos])
    if not photos:
        parser.error(f"no photos under {args.photos}; pass --photos DIR")
    workdir = Path(tempfile.mkdtemp(prefix="ray-build-", dir=args.workdir))
    results: dict = {"machine": describe_machine(), "builds": []}
    try:
        tiny = workdir / "tiny"
        tiny.mkdir()
        for photo in photos[:args.tiny]:
            shutil.copy(photo, tiny / photo.name)
        synthetic = workdir / "synthetic"
        results["synthetic_generation_s"] = round(make_synthetic(photos, synthetic, args.synthetic), 1)
        for name, source in (("tiny", tiny), ("photos", args.photos), ("synthetic", synthetic)):
            galleries = {}
            for engine in ("local", "ray"):
                galleries[engine] = workdir / f"{name}-{engine}"
                record = run_build(source, galleries[engine], engine, args)
                record["catalogue"] = name
                results["builds"].append(record)
                print(json.dumps(record), flush=True)
            results[f"equality_{name}"] = compare(galleries["local"], galleries["ray"])
            print(json.dumps({f"equality_{name}": results[f"equality_{name}"]}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for engine in ("local", "ray"):
        fixed, per_image = fit([record for record in results["builds"] if record["engine"] == engine])
        results[f"fit_{engine}"] = {"fixed_s": round(fixed, 2), "ms_per_image": round(per_image * 1000, 2)}
    local, ray = results["fit_local"], results["fit_ray"]
    saved_ms = local["ms_per_image"] - ray["ms_per_image"]
    extra_s = ray["fixed_s"] - local["fixed_s"]
    results["ray_faster_from_images"] = round(extra_s * 1000 / saved_ms) if saved_ms > 0 else None
    results["machine"]["load_average_at_end"] = os.getloadavg()

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
