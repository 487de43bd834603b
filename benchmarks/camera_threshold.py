"""Measure how the camera's default match threshold separates true frames from unknown photos.

    python benchmarks/camera_threshold.py [--model MODEL] [--scores]

For each gallery below, the threshold comes from `derive_threshold` (the gallery's
nearest-neighbour scores). Each gallery photo is then turned into a 640x480 video
frame: letterboxed and JPEG-compressed at quality 75, as in a webcam's MJPEG stream.
A darkened copy (brightness x0.4) and a blurred copy (Gaussian radius 3) of each
frame are added. Photos that are not in the gallery become frames the same way. The table gives the share
of frames whose best gallery score passes the threshold, and for true frames also
whether the best item is the right one. ``--scores`` adds, under each row, the
distribution of the best scores of each kind of frame (minimum, 10th, 50th and 90th
percentiles, maximum), so that a rule can be judged by its margins as well.

Galleries (from ../shared/assets, skipped when missing; scikit-image photos always):
- skimage: the 19 scikit-image photos; unknown: the shared photos, Flowers17 and COIL-100 objects.
- flowers+coil: one Flowers17 photo per species and one COIL-100 view of 50 objects;
  unknown: other photos of the same species (hard), scikit-image and shared photos.
- shared: the 13 shared photos; unknown: scikit-image photos and Flowers17.
- coil-views: all 4 views of 40 COIL-100 objects (several photos per object);
  unknown: 40 other COIL-100 objects.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
sys.path.insert(0, str(ROOT / "tools"))

import sample_photos  # noqa: E402  (lives in tools/, made importable above)

from edgeembed import Embedder  # noqa: E402
from edgeembed.camera_events import derive_threshold  # noqa: E402
from edgeembed.gallery import Gallery  # noqa: E402

FRAME_SIZE = (640, 480)


def letterbox(photo: Image.Image, size: tuple[int, int] = FRAME_SIZE) -> Image.Image:
    """Fit a photo into a black frame of `size` (width, height), keeping its aspect ratio."""
    width, height = size
    scale = min(width / photo.width, height / photo.height)
    resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BILINEAR)
    frame = Image.new("RGB", size)
    frame.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
    return frame


def video_frame(photo: Image.Image, quality: int = 75) -> Image.Image:
    """Letterbox a photo into a 640x480 frame and pass it through JPEG, as an MJPEG camera would."""
    frame = letterbox(photo)
    buffer = io.BytesIO()
    frame.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


FRAME_KINDS = {
    "frame": video_frame,
    "dark": lambda photo: ImageEnhance.Brightness(video_frame(photo)).enhance(0.4),
    "blur": lambda photo: video_frame(photo).filter(ImageFilter.GaussianBlur(3)),
}


def _folder_photos(folder: Path, per_folder: int, start: int = 0) -> dict[str, Image.Image]:
    found = {}
    for sub in sorted(path for path in folder.iterdir() if path.is_dir()):
        for path in sorted(sub.iterdir())[start:start + per_folder]:
            found[f"{sub.name}/{path.name}"] = Image.open(path).convert("RGB")
    return found


def photo_sets() -> dict[str, tuple[dict, dict]]:
    """Return each gallery name with its (gallery photos, unknown photos)."""
    skimage = {name: sample_photos.load_skimage_photo(name) for name in sample_photos.PHOTO_NAMES}
    if not ASSETS.is_dir():
        print(f"{ASSETS} not found: measuring the scikit-image gallery only", file=sys.stderr)
        return {}
    shared = {path.name: Image.open(path).convert("RGB")
              for path in sorted((ASSETS / "images").rglob("*")) if path.suffix in (".bmp", ".jpg")}
    flowers = _folder_photos(ASSETS / "datasets" / "flowers17", 1)
    other_flowers = _folder_photos(ASSETS / "datasets" / "flowers17", 2, start=1)
    coil = _folder_photos(ASSETS / "datasets" / "coil100", 4)
    coil_objects = sorted({key.split("/")[0] for key in coil}, key=lambda name: int(name[3:]))
    first_views: dict[str, Image.Image] = {}
    for key in coil:
        if key.split("/")[0] not in {name.split("/")[0] for name in first_views}:
            first_views[key] = coil[key]

    def objects(names):
        return {key: photo for key, photo in coil.items() if key.split("/")[0] in names}

    gallery_objects, unknown_objects = coil_objects[:40], coil_objects[-40:]
    return {
        "skimage": (skimage, {**shared, **flowers, **{k: v for k, v in first_views.items()
                                                         if k.split("/")[0] in unknown_objects}}),
        "flowers+coil": ({**flowers, **{k: v for k, v in first_views.items()
                                        if k.split("/")[0] in coil_objects[:50]}},
                         {**other_flowers, **skimage, **shared}),
        "shared": (shared, {**skimage, **flowers}),
        "coil-views": (objects(gallery_objects),
                       {k: v for k, v in first_views.items() if k.split("/")[0] in unknown_objects}),
    }


def measure(embedder: Embedder, gallery_photos: dict, unknown_photos: dict) -> dict:
    """Return the derived threshold, the share of each kind of frame that passes it, and the best scores."""
    ids = list(gallery_photos)
    vectors = np.stack([embedder.embed(photo) for photo in gallery_photos.values()])
    gallery = Gallery.build(vectors, ids, model_fingerprint=embedder.fingerprint)
    threshold, level = derive_threshold(gallery)

    # One photo per object is enough for the true frames of multi-view galleries.
    objects = {}
    for item_id in ids:
        objects.setdefault(item_id.split("/")[0] if "/" in item_id else item_id, item_id)
    result = {"items": len(ids), "level": level, "threshold": threshold, "scores": {}}
    for kind, make in FRAME_KINDS.items():
        scores, right = [], 0
        for item_id in objects.values():
            best = gallery.search_exact(embedder.embed(make(gallery_photos[item_id])), 1)[0]
            scores.append(best.score)
            right += best.id == item_id
        result["scores"][kind] = np.array(scores)
        result[kind] = (float(np.mean(result["scores"][kind] >= threshold)), right / len(objects))

    unknown = np.array([gallery.search_exact(embedder.embed(video_frame(photo)), 1)[0].score
                        for photo in unknown_photos.values()])
    result["scores"]["unknown"] = unknown
    result["unknown"] = (float(np.mean(unknown >= threshold)), float(unknown.max()), len(unknown))
    return result


def score_lines(scores: dict[str, np.ndarray]) -> list[str]:
    """Format the best-score distribution of each kind of frame: min, p10, p50, p90, max."""
    lines = []
    for kind, values in scores.items():
        points = np.percentile(values, [0, 10, 50, 90, 100])
        lines.append(f"  {kind:8} best scores " + " ".join(f"{value:.3f}" for value in points))
    return lines


def main() -> None:
    """Print one table row per gallery."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="TFLite embedder (default: the shipped model)")
    parser.add_argument("--scores", action="store_true",
                        help="also print each gallery's best-score distribution per kind of frame")
    args = parser.parse_args()
    embedder = Embedder(args.model)
    sets = photo_sets() or {"skimage": ({name: sample_photos.load_skimage_photo(name)
                                         for name in sample_photos.PHOTO_NAMES}, {})}

    print(f"model {embedder.model_path.name}")
    print(f"{'gallery':14} {'items':>5} {'nn p90':>7} {'thresh':>7} {'frame %':>8} {'top1 %':>7} "
          f"{'dark %':>7} {'blur %':>7} {'unknown %':>9} {'unk max':>8} {'unknowns':>8}")
    for name, (gallery_photos, unknown_photos) in sets.items():
        if not unknown_photos:
            continue
        row = measure(embedder, gallery_photos, unknown_photos)
        unknown_share, unknown_max, unknown_count = row["unknown"]
        print(f"{name:14} {row['items']:5d} {row['level']:7.3f} {row['threshold']:7.3f} "
              f"{100 * row['frame'][0]:8.0f} {100 * row['frame'][1]:7.0f} {100 * row['dark'][0]:7.0f} "
              f"{100 * row['blur'][0]:7.0f} {100 * unknown_share:9.1f} {unknown_max:8.3f} {unknown_count:8d}",
              flush=True)
        if args.scores:
            print("\n".join(score_lines(row["scores"])), flush=True)


if __name__ == "__main__":
    main()
