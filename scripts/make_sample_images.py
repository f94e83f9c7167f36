"""Rebuild ``vitspec/data/images/`` from photographs that ship inside installed wheels.

Each source file is downscaled so its shorter side is 256 px (aspect kept, Lanczos) and saved as
JPEG quality 90. The output is deterministic for a given Pillow version. The licence notes for the
files live in ``vitspec/data/images/LICENSES`` (written by hand from the wheels' own texts; this
script does not touch it).

Usage:
    .venv/bin/python scripts/make_sample_images.py

Left out on purpose: ``skimage/data/motorcycle_left.png`` and ``motorcycle_right.png`` (Middlebury
2014 stereo benchmark). scikit-image's docstring credits the authors but states no licence, so
they cannot be listed as public domain / CC0 / CC BY.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

SHORT_SIDE = 256
QUALITY = 90
OUT_DIR = Path(__file__).resolve().parent.parent / "vitspec" / "data" / "images"

# (package, path inside the package, output name)
SOURCES: list[tuple[str, str, str]] = [
    ("skimage", "data/astronaut.png", "astronaut.jpg"),
    ("skimage", "data/chelsea.png", "chelsea.jpg"),
    ("skimage", "data/coffee.png", "coffee.jpg"),
    ("skimage", "data/rocket.jpg", "rocket.jpg"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg", "retina.jpg"),
    ("skimage", "data/ihc.png", "ihc.jpg"),
    ("skimage", "data/coins.png", "coins.jpg"),
    ("sklearn", "datasets/images/china.jpg", "china.jpg"),
    ("sklearn", "datasets/images/flower.jpg", "flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper.jpg"),
]


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def shrink(src: Path, dst: Path, short_side: int = SHORT_SIDE) -> tuple[int, int]:
    """Downscale ``src`` so its shorter side is ``short_side`` and save it as JPEG at ``dst``."""
    with Image.open(src) as img:
        img.load()
        # Keep single-channel images single-channel; everything else becomes RGB.
        img = img.convert("L") if img.mode in ("L", "I;16", "I", "1") else img.convert("RGB")
        w, h = img.size
        scale = short_side / min(w, h)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS)
        img.save(dst, "JPEG", quality=QUALITY, optimize=True)
        return img.size


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    total = 0
    for pkg, rel, name in SOURCES:
        src = package_dir(pkg) / rel
        dst = OUT_DIR / name
        w, h = shrink(src, dst)
        kb = dst.stat().st_size / 1024
        total += dst.stat().st_size
        print(f"{name:24s} {w:4d}x{h:<4d} {kb:6.1f} KB  <- {pkg}/{rel}")
    print(f"total {total / 1024:.1f} KB in {OUT_DIR}")


if __name__ == "__main__":
    main()
