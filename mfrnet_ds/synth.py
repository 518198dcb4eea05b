"""Synthetic raw trees in the three real layouts, for tests and the demo (nothing can be downloaded).

Each identity is a fixed set of parts (persons: head, torso, arms, legs, shoes, maybe a bag; vehicles:
body, cabin, windows, wheels, lights) with its own colours, a pattern (stripes, checks, a logo), a
near-infrared reflectance and a temperature per part. That appearance is the same under every camera
and in every modality, and the three modalities of a sample share one geometry, so they are pixel
aligned: RGB shows the colours, NIR a separate per-part reflectance (not a function of the colour),
TIR a blurred heat silhouette. Each camera adds its own nuisance: background scenery, light level and
colour cast, sensor noise; each image adds a shift, a scale, a left/right view and sometimes an
occluding pole. Everything is drawn from `numpy.random.default_rng` seeded by (seed, role, ids), so a
seed gives the same tree byte for byte.

Splits: the last `test_ids` identities (default half) are the test identities.
- rgbnt201: train ids in train_171/, test ids in test/ (query = gallery).
- rgbnt100: per test id and camera the first image is a query, the rest are gallery.
- msvr310: each identity is seen in `scenes` scenes; image k of a camera is in scene k % scenes; the
  first image of scene 0 of each camera is a query, the rest are gallery.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from mfrnet_ds.raw import PROTOCOLS
from mfrnet_ds.shards import SYNTHETIC_MARKER

LAYOUTS = ("rgbnt201", "rgbnt100", "msvr310")   # the layouts _name/_folder/_write below can write
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Part:
    shape: str  # "rect" or "ellipse"
    box: tuple[float, float, float, float]  # u0, v0, u1, v1 in the object's box (0..1)
    rgb: tuple[float, float, float]
    nir: float
    temp: float
    pattern: int = 0  # 0 none, 1 horizontal stripes, 2 vertical stripes, 3 checks, 4 logo
    pattern_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern_nir: float = 0.0
    freq: int = 4


def _colour(rng, hue: float | None = None) -> tuple[float, float, float]:
    # Saturated and pale colours both occur; pure HSV keeps identities far apart in colour.
    h, s, v = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.25, 0.95)
    h = h if hue is None else hue
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _person(rng) -> list[Part]:
    skin = [(0.93, 0.76, 0.62), (0.78, 0.57, 0.42), (0.55, 0.38, 0.26), (0.36, 0.24, 0.16)][rng.integers(4)]
    top, bottom, shoes = _colour(rng), _colour(rng), _colour(rng)
    pattern = int(rng.integers(5))
    decor = dict(pattern=pattern, pattern_rgb=_colour(rng), pattern_nir=float(rng.uniform(0.1, 0.9)),
                 freq=int(rng.integers(3, 8)))
    top_nir, bottom_nir = float(rng.uniform(0.15, 0.95)), float(rng.uniform(0.15, 0.95))
    top_temp, bottom_temp = float(rng.uniform(0.45, 0.8)), float(rng.uniform(0.45, 0.8))
    sleeves = top if rng.random() < 0.6 else skin
    parts = [
        Part("ellipse", (0.37, 0.01, 0.63, 0.16), skin, 0.75, 0.95),
        Part("ellipse", (0.36, 0.0, 0.64, 0.07), _colour(rng) if rng.random() < 0.3 else (0.1, 0.08, 0.06), 0.3, 0.7),
        Part("rect", (0.14, 0.18, 0.26, 0.53), sleeves, top_nir, 0.9 if sleeves is skin else top_temp),
        Part("rect", (0.74, 0.18, 0.86, 0.53), sleeves, top_nir, 0.9 if sleeves is skin else top_temp),
        Part("rect", (0.25, 0.16, 0.75, 0.56), top, top_nir, top_temp, **decor),
    ]
    if rng.random() < 0.3:  # skirt or long coat: one block instead of two legs
        parts.append(Part("rect", (0.26, 0.55, 0.74, 0.8), bottom, bottom_nir, bottom_temp))
        parts += [Part("rect", (0.32, 0.8, 0.46, 0.93), skin, 0.75, 0.9),
                  Part("rect", (0.54, 0.8, 0.68, 0.93), skin, 0.75, 0.9)]
    else:
        parts += [Part("rect", (0.28, 0.55, 0.49, 0.93), bottom, bottom_nir, bottom_temp),
                  Part("rect", (0.51, 0.55, 0.72, 0.93), bottom, bottom_nir, bottom_temp)]
    parts += [Part("rect", (0.27, 0.93, 0.49, 0.99), shoes, 0.2, 0.5),
              Part("rect", (0.51, 0.93, 0.73, 0.99), shoes, 0.2, 0.5)]
    if rng.random() < 0.4:
        parts.append(Part("rect", (0.7, 0.3, 0.92, 0.56), _colour(rng), float(rng.uniform(0.1, 0.9)), 0.4))
    return parts


def _vehicle(rng) -> list[Part]:
    body, roof = _colour(rng), _colour(rng) if rng.random() < 0.4 else None
    body_nir, body_temp = float(rng.uniform(0.15, 0.95)), float(rng.uniform(0.4, 0.7))
    decor = dict(pattern=int(rng.integers(5)), pattern_rgb=_colour(rng), pattern_nir=float(rng.uniform(0.1, 0.9)),
                 freq=int(rng.integers(2, 6)))
    cabin_top = float(rng.uniform(0.08, 0.2))
    glass = (0.12, 0.14, 0.18)
    return [
        Part("rect", (0.04, 0.4, 0.96, 0.8), body, body_nir, body_temp, **decor),
        Part("rect", (0.22, cabin_top, 0.74, 0.42), roof or body, body_nir, body_temp),
        Part("rect", (0.26, cabin_top + 0.04, 0.47, 0.38), glass, 0.1, 0.35),
        Part("rect", (0.5, cabin_top + 0.04, 0.7, 0.38), glass, 0.1, 0.35),
        Part("rect", (0.74, 0.4, 0.96, 0.62), body, body_nir, float(rng.uniform(0.75, 0.95))),  # engine: warm
        Part("ellipse", (0.12, 0.66, 0.3, 0.98), (0.06, 0.06, 0.06), 0.05, 0.8),
        Part("ellipse", (0.7, 0.66, 0.88, 0.98), (0.06, 0.06, 0.06), 0.05, 0.8),
        Part("rect", (0.92, 0.46, 0.97, 0.55), (0.95, 0.9, 0.55), 0.9, 0.9),
    ]


@dataclass(frozen=True)
class Camera:
    bg: np.ndarray  # (H, W, 3) scenery colour
    bg_nir: np.ndarray  # (H, W)
    bg_temp: np.ndarray  # (H, W)
    gain: float
    cast: np.ndarray  # (3,)
    noise: float


def _camera(rng, size, index: int) -> Camera:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Golden-ratio hue steps: neighbouring cameras get clearly different scenery.
    hue = (index * 0.618 + rng.uniform(-0.05, 0.05)) % 1
    base, other = np.array(_colour(rng, hue), np.float32), np.array(_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    bg = 0.6 * base + 0.4 * ramp[..., None] * other
    bg_nir = np.full((h, w), rng.uniform(0.2, 0.6), np.float32) + 0.2 * ramp
    bg_temp = np.full((h, w), rng.uniform(0.05, 0.3), np.float32) + 0.1 * ramp
    for _ in range(int(rng.integers(3, 7))):  # scenery blocks: walls, signs, parked things
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = min(h, y0 + int(rng.integers(h // 8, h // 2))), min(w, x0 + int(rng.integers(w // 8, w // 2)))
        bg[y0:y1, x0:x1] = _colour(rng)
        bg_nir[y0:y1, x0:x1] = rng.uniform(0.1, 0.8)
        bg_temp[y0:y1, x0:x1] = rng.uniform(0.05, 0.45)
    cast = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    return Camera(bg, bg_nir, bg_temp, float(rng.uniform(0.6, 1.25)), cast, float(rng.uniform(0.01, 0.04)))


def _paint(canvas_rgb, canvas_nir, canvas_temp, parts, geometry):
    """Paint parts into the three canvases in place; geometry = (cx, cy, bw, bh, flip) in pixels."""
    h, w = canvas_nir.shape
    cx, cy, bw, bh, flip = geometry
    left, top = cx - bw / 2, cy - bh / 2
    for part in parts:
        u0, v0, u1, v1 = part.box
        if flip:
            u0, u1 = 1 - u1, 1 - u0
        x0, x1 = int(max(0, np.floor(left + u0 * bw))), int(min(w, np.ceil(left + u1 * bw)))
        y0, y1 = int(max(0, np.floor(top + v0 * bh))), int(min(h, np.ceil(top + v1 * bh)))
        if x0 >= x1 or y0 >= y1:
            continue
        # Local part coordinates in 0..1 over the window, from pixel centres.
        lu = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - left) / bw - u0) / (u1 - u0)
        lv = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - top) / bh - v0) / (v1 - v0)
        lu, lv = np.meshgrid(lu, lv)
        if part.shape == "ellipse":
            mask = (2 * lu - 1) ** 2 + (2 * lv - 1) ** 2 <= 1
        else:
            mask = (lu >= 0) & (lu <= 1) & (lv >= 0) & (lv <= 1)
        if flip:
            lu = 1 - lu
        rgb = np.broadcast_to(np.array(part.rgb, np.float32), mask.shape + (3,)).copy()
        nir = np.full(mask.shape, part.nir, np.float32)
        if part.pattern:
            f = part.freq
            deco = {
                1: np.floor(lv * f) % 2 == 0,
                2: np.floor(lu * f) % 2 == 0,
                3: (np.floor(lv * f) + np.floor(lu * f)) % 2 == 0,
                4: (np.abs(lu - 0.5) < 0.22) & (np.abs(lv - 0.45) < 0.18),
            }[part.pattern]
            rgb[deco] = part.pattern_rgb
            nir[deco] = part.pattern_nir
        win = (slice(y0, y1), slice(x0, x1))
        canvas_rgb[win][mask] = rgb[mask]
        canvas_nir[win][mask] = nir[mask]
        canvas_temp[win][mask] = part.temp


def render(parts, camera: Camera, rng, size, vehicle: bool) -> tuple[Image.Image, Image.Image, Image.Image]:
    """One aligned (RGB, NIR, TIR) triplet of the identity `parts` seen by `camera`."""
    h, w = size
    rgb, nir, temp = camera.bg.copy(), camera.bg_nir.copy(), camera.bg_temp.copy()
    scale = rng.uniform(0.82, 1.0)
    bw, bh = (0.92 if vehicle else 0.8) * w * scale, (0.8 if vehicle else 0.94) * h * scale
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.04, 0.04) * h
    _paint(rgb, nir, temp, parts, (cx, cy, bw, bh, bool(rng.random() < 0.5)))
    if rng.random() < 0.25:  # an occluding pole, the same in every modality
        x0 = int(rng.integers(0, w - w // 10))
        x1 = x0 + int(rng.integers(w // 20, w // 10))
        rgb[:, x0:x1] = _colour(rng)
        nir[:, x0:x1] = rng.uniform(0.2, 0.8)
        temp[:, x0:x1] = rng.uniform(0.1, 0.3)
    light = camera.gain * rng.uniform(0.92, 1.08)
    noise = lambda shape, sigma: rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)  # noqa: E731
    rgb = rgb * (light * camera.cast) + noise(rgb.shape, camera.noise)
    nir = nir * np.float32(light) + noise(nir.shape, camera.noise)
    to_u8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    grey = lambda a: Image.fromarray(to_u8(a), "L").convert("RGB")  # noqa: E731
    tir = Image.fromarray(to_u8(temp), "L").filter(ImageFilter.GaussianBlur(2))
    tir = np.asarray(tir, np.float32) / 255 + noise(temp.shape, 0.015)
    return Image.fromarray(to_u8(rgb), "RGB"), grey(nir), grey(tir)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _name(layout: str, pid: int, cam: int, k: int, scene: int) -> str:
    if layout == "rgbnt201":
        return f"{pid:06d}_cam{cam + 1}_{k:04d}.jpg"
    if layout == "rgbnt100":
        return f"{pid:04d}_c{cam + 1:03d}_{k:05d}.jpg"
    return f"{pid:04d}_s{scene:03d}_v{cam}_{k:03d}.jpg"


def _folder(layout: str, split: str) -> str:
    return {
        "rgbnt201": {"train": "train_171", "query": "test", "gallery": "test"},
        "rgbnt100": {"train": "rgbir/bounding_box_train", "query": "rgbir/query", "gallery": "rgbir/bounding_box_test"},
        "msvr310": {"train": "bounding_box_train", "query": "query3", "gallery": "bounding_box_test"},
    }[layout][split]


def _write(layout: str, out: Path, split: str, pid: int, name: str, images) -> None:
    folder = out / _folder(layout, split)
    if layout == "rgbnt100":
        strip = Image.new("RGB", (images[0].width * 3, images[0].height))
        for i, image in enumerate(images):
            strip.paste(image, (i * image.width, 0))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg(strip))
        return
    subdirs = ("RGB", "NI", "TI") if layout == "rgbnt201" else ("vis", "ni", "th")
    for sub, image in zip(subdirs, images):
        path = folder / (f"{pid:04d}/{sub}" if layout == "msvr310" else sub) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(image))


def make_tree(layout: str, out, *, ids: int = 24, cams: int = 4, per_cam: int = 4, seed: int = 0,
              test_ids: int | None = None, scenes: int = 2) -> dict:
    """Write a raw tree; return what it holds: per split the sample count and the sorted ids."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    n_test = ids // 2 if test_ids is None else test_ids
    if not 1 <= n_test < ids:
        raise ValueError(f"ids={ids}, test_ids={n_test}: need at least one train and one test identity")
    protocol = PROTOCOLS[layout]
    if not 1 <= cams <= protocol.max_cameras:
        raise ValueError(f"cams={cams}: {layout} names hold cameras 1..{protocol.max_cameras}")
    if ids > protocol.max_id or per_cam < 1:
        raise ValueError(f"ids={ids}, per_cam={per_cam}: {layout} allows ids up to {protocol.max_id}, per_cam >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # shards.build copies this into the manifest ("synthetic": true), so tracking can tell fake from real
    (out / SYNTHETIC_MARKER).write_text(f"synthetic {layout} tree from mfrnet_ds.synth (seed {seed})\n")
    size = protocol.image_size
    vehicle = size[1] > size[0]   # the vehicle datasets' crops are wider than tall, the persons' taller
    # Scene folders exist even when a split ends up empty, as in the real trees.
    for split in ("train", "query", "gallery"):
        folder = out / _folder(layout, split)
        for sub in {"rgbnt201": ("RGB", "NI", "TI"), "rgbnt100": ("",), "msvr310": ("",)}[layout]:
            (folder / sub).mkdir(parents=True, exist_ok=True)
    summary = {"layout": layout, "train": 0, "query": 0, "gallery": 0, "train_ids": [], "test_ids": []}
    cameras: dict = {c: _camera(np.random.default_rng([seed, 1, c]), size, c) for c in range(cams)}
    n_scenes = max(1, min(scenes, per_cam)) if layout == "msvr310" else 1
    for index, pid in enumerate(range(1, ids + 1)):
        parts = (_vehicle if vehicle else _person)(np.random.default_rng([seed, 0, pid]))
        is_test = index >= ids - n_test
        summary["test_ids" if is_test else "train_ids"].append(pid)
        for cam in range(cams):
            for k in range(per_cam):
                scene_index = k % n_scenes
                scene = 1 + (index * n_scenes + scene_index) % 999
                if layout == "msvr310" and scene_index:
                    # Another scene is another place and time: other scenery and light, same camera id.
                    if (cam, scene) not in cameras:
                        cameras[cam, scene] = _camera(np.random.default_rng([seed, 2, cam, scene]), size, cam + scene)
                    camera = cameras[cam, scene]
                else:
                    camera = cameras[cam]
                images = render(parts, camera, np.random.default_rng([seed, 3, pid, cam, k]), size, vehicle)
                if not is_test:
                    split = "train"
                elif layout == "rgbnt201":
                    split = "query"
                else:
                    split = "query" if k == 0 else "gallery"
                _write(layout, out, split, pid, _name(layout, pid, cam, k, scene), images)
                summary[split] += 1
    if layout == "rgbnt201":
        summary["gallery"] = summary["query"]
    return summary
