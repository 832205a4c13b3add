"""The demo world: a small, deterministic stand-in for DataComp that runs offline on a laptop.

``build_world(out)`` draws a few dozen visual *concepts* (shape x colour x fill texture, e.g. "red
striped triangle") procedurally with Pillow, captions them from English templates, injects the
defects that DataComp's filters exist to remove, and writes everything in DataComp's formats::

    OUT/
      world.json                     manifest: seed, concepts, defect rates and counts, layout
      metadata/%08d.parquet          DataComp pool metadata (exactly store.DATACOMP_COLUMNS);
                                     scores are NaN and there is no .npz until
                                     write_pool_embeddings() runs an encoder over the pool
      metadata/%08d.npz              (after write_pool_embeddings) b32_img, b32_txt, l14_img, l14_txt
      truth/%08d.parquet             ground truth, row-aligned with metadata/: concept, defect, ...
      shards/%08d.tar|.parquet|_stats.json   the pool "downloaded" by img2dataset (some failures)
      teacher/shards/...             a separate clean split (same layout) to train the teacher on
      eval/<task>/...                held-out tasks in the clip_benchmark webdataset layout
      eval/tasklist.json             task -> type, main metric, size, classes

Defects (column ``defect`` of ``truth/``; each row has at most one, drawn as exact counts from
``DEFAULT_RATES``): ``mismatched`` (the caption describes another concept), ``non_english``
(German/French/Spanish/Italian caption of the right concept), ``junk`` (alt-text such as
"IMG_2034.jpg", "click here"), ``tiny`` (original shorter side < 200 px; the stored image is
blurred down to that resolution when it is below 64 px), ``extreme_aspect`` (original aspect > 3;
the stored image is the centre crop of a banner, so the object is often cut off or missing),
``duplicate`` (same image bytes and caption as another row, new uid and url) and
``near_duplicate`` (the same scene shifted, re-lit and re-encoded, with a new caption).
Independently, ``FAILED_RATE`` of the rows fail to download (in the shard parquet, not in the tar)
and ``FACE_RATE`` carry a face-like drawing whose box is in ``face_bboxes``.

Everything is a pure function of the arguments (``world.json``'s ``build_seconds`` aside): each
row's scene parameters are drawn up front and the image is rendered from them, so a row can be
re-rendered at any time (``pool_images`` does that for rows whose download failed). Shard ``k`` of
``metadata/``, ``truth/`` and ``shards/`` hold the same rows; keys follow img2dataset with
DataComp's settings (``oom_shard_count`` 8): ``shard * 10**ceil(log10(shard_size)) + i``,
zero-padded to 8 + ceil(log10(shard_size)) digits (12 for the default 10,000 per shard).

Public API: ``build_world``, ``write_pool_embeddings``, ``load_world``, ``read_truth``,
``pool_images``, ``world_concepts``, ``render``/``scene_jpeg``/``scene_from_truth``,
``make_concepts``, and the constants ``DEFAULT_RATES``, ``FAILED_RATE``, ``FACE_RATE``,
``EVAL_TASKS``, ``EVAL_TEMPLATES``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import parallel
from dcdb.errors import SourceError, UsageError, WorkerError
from dcdb.io import atomic_path, prepare_folder, write_json
from dcdb.store import DATACOMP_COLUMNS
from dcdb.tario import Member, TarReader, write_samples

WORLD_FORMAT = "dcdb-world"
WORLD_VERSION = 1
MANIFEST = "world.json"
IMAGE_SIZE = 64
JPEG_QUALITY = 90
SHARD_SIZE = 10_000  # DataComp's img2dataset number_sample_per_shard
OOM_SHARD_COUNT = 8  # DataComp names shards %08d
LAYOUT = ("world.json", "metadata", "truth", "shards", "teacher", "eval")

# ------------------------------------------------------------------------------- vocabulary
#
# The words and colours the world is made of live in data files beside this module
# (dcdb/demo/data/*.json, package data), one per theme:
#   concepts.json  shapes, colours (name -> RGB), fill textures, backgrounds (pool and shifted eval)
#   english.json   English synonyms of shapes/colours/textures, caption templates, prefixes, suffixes
#   foreign.json   German/French/Spanish/Italian: shape -> (noun, gender); colour -> word (de) or
#                  (masculine, feminine); texture -> phrase; background -> word; article; templates
#   web.json       junk alt-texts, img2dataset download errors, url hosts and folders
#   eval.json      the eval tasks' prompt templates and task descriptions (tasklist.json)
# The orders in these files are part of the world: a reordered list draws another world.


@cache
def vocabulary(theme: str) -> dict[str, Any]:
    """The table file ``dcdb/demo/data/<theme>.json``, read once; its lists as tuples."""
    from importlib import resources

    text = resources.files("dcdb.demo").joinpath("data", f"{theme}.json").read_text(encoding="utf-8")
    return _frozen(json.loads(text))


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


_CONCEPTS, _ENGLISH, _WEB = vocabulary("concepts"), vocabulary("english"), vocabulary("web")
SHAPES: tuple[str, ...] = _CONCEPTS["shapes"]
COLOURS: dict[str, tuple[int, int, int]] = _CONCEPTS["colours"]
TEXTURES: tuple[str, ...] = _CONCEPTS["textures"]
# Backgrounds of the pool, the teacher split and the clean eval tasks (named in captions).
BACKGROUNDS: dict[str, tuple[int, int, int]] = _CONCEPTS["backgrounds"]
# Backgrounds seen only by the distribution-shifted eval task.
SHIFT_BACKGROUNDS: dict[str, tuple[int, int, int]] = _CONCEPTS["shift_backgrounds"]
BG_PLAIN, BG_GRADIENT, BG_MOTTLED, BG_GRAIN = 0, 1, 2, 3

DEFECTS = (
    "none",
    "mismatched",
    "non_english",
    "junk",
    "tiny",
    "extreme_aspect",
    "duplicate",
    "near_duplicate",
)
# Fraction of pool rows with each defect (exact counts, rounded); the rest are "none".
DEFAULT_RATES: dict[str, float] = {
    "mismatched": 0.25,
    "non_english": 0.10,
    "junk": 0.08,
    "tiny": 0.05,
    "extreme_aspect": 0.04,
    "duplicate": 0.04,
    "near_duplicate": 0.04,
}
FAILED_RATE = 0.03  # rows whose download fails (independent of the defect)
FACE_RATE = 0.06  # rows with a face-like drawing and a face box (never extreme_aspect)
CONCEPT_SKEW = 0.3  # concept frequency ~ (rank + 1) ** -CONCEPT_SKEW: a mild long tail

EN_SHAPE: dict[str, tuple[str, ...]] = _ENGLISH["shape"]
EN_COLOUR: dict[str, tuple[str, ...]] = _ENGLISH["colour"]
EN_TEX_ADJ: dict[str, tuple[str, ...]] = _ENGLISH["texture_adjective"]
EN_TEX_WITH: dict[str, tuple[str, ...]] = _ENGLISH["texture_with"]
EN_TEMPLATES: tuple[str, ...] = _ENGLISH["templates"]
EN_PREFIXES: tuple[str, ...] = _ENGLISH["prefixes"]
EN_SUFFIXES: tuple[str, ...] = _ENGLISH["suffixes"]
EVAL_TEMPLATES: tuple[str, ...] = vocabulary("eval")["templates"]
FOREIGN: dict[str, dict[str, Any]] = vocabulary("foreign")
LANGUAGES = tuple(FOREIGN)
JUNK_FIXED: tuple[str, ...] = _WEB["junk_captions"]
DOWNLOAD_ERRORS: tuple[str, ...] = _WEB["download_errors"]
HOSTS: tuple[str, ...] = _WEB["hosts"]
URL_FOLDERS: tuple[str, ...] = _WEB["url_folders"]

# --------------------------------------------------------------------------------- concepts


@dataclass(frozen=True)
class Concept:
    """One visual concept: a shape in a colour with a fill texture."""

    id: int
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        """Canonical English name, used as the eval class name ("red striped triangle")."""
        tex = "" if self.texture == "solid" else f"{self.texture} "
        return f"{self.colour} {tex}{self.shape}"


def make_concepts(n: int, seed: int = 0) -> list[Concept]:
    """Choose ``n`` distinct shape x colour x texture combinations, every attribute used evenly."""
    combos = list(itertools.product(SHAPES, COLOURS, TEXTURES))
    if not 2 <= n <= len(combos):
        raise UsageError(
            f"concepts must be between 2 and {len(combos)}, got {n}",
            hint="pass a number of concepts in that range (--concepts)",
        )
    rng = _rng(seed, "concepts")
    order = [combos[i] for i in rng.permutation(len(combos))]
    uses: dict[str, int] = {}
    chosen: list[tuple[str, str, str]] = []
    for _ in range(n):
        best = min(
            (c for c in order if c not in chosen),
            key=lambda c: uses.get(c[0], 0) + uses.get(c[1], 0) + uses.get(c[2], 0),
        )
        chosen.append(best)
        for attr in best:
            uses[attr] = uses.get(attr, 0) + 1
    return [Concept(i, *c) for i, c in enumerate(chosen)]


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream per purpose, so one part's size never shifts another's draws."""
    key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & (2**63 - 1), key])


# --------------------------------------------------------------------------------- geometry


def _regular(k: int, inner: float | None = None, phase: float = -math.pi / 2) -> np.ndarray:
    """A regular k-gon (or a star with 2k points when ``inner`` is given), circumradius 1."""
    m = 2 * k if inner else k
    t = phase + np.arange(m) * 2 * math.pi / m
    r = np.ones(m) if not inner else np.where(np.arange(m) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    """The classic parametric heart curve, scaled into the unit box."""
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 3], axis=1)
    return pts / np.abs(pts).max()


def _crescent() -> np.ndarray:
    """The unit disc minus a disc of radius 0.8 centred at (0.5, 0), as one polygon."""
    xi = (1 + 0.5**2 - 0.8**2) / (2 * 0.5)
    a = math.atan2(math.sqrt(1 - xi**2), xi)
    outer = np.linspace(a, 2 * math.pi - a, 28)
    b = math.atan2(math.sqrt(1 - xi**2), xi - 0.5)
    inner = np.linspace(2 * math.pi - b, b, 20)
    return np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], 1),
            np.stack([0.5 + 0.8 * np.cos(inner), 0.8 * np.sin(inner)], 1),
        ]
    )


def _cross() -> np.ndarray:
    """A plus-shaped cross with arms 0.66 wide."""
    w = 0.33
    return np.array(
        [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ],
        dtype=float,
    )


def _arrow() -> np.ndarray:
    """An arrow pointing right: a shaft and a triangular head."""
    return np.array(
        [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)],
        dtype=float,
    )


POLYGONS: dict[str, np.ndarray] = {
    "circle": _regular(40),
    "square": _regular(4, phase=math.pi / 4) * 0.92,
    "triangle": _regular(3) * 1.05 + np.array([0, 0.2]),
    "star": _regular(5, inner=0.45),
    "hexagon": _regular(6),
    "cross": _cross() * 0.95,
    "heart": _heart(),
    "crescent": _crescent(),
    "arrow": _arrow(),
}


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y coordinates of an (h, w) canvas (cached)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx + 0.5, yy + 0.5


# -------------------------------------------------------------------------------- rendering


@dataclass
class Scene:
    """Everything needed to redraw one image (the per-row ground-truth columns of ``truth/``)."""

    concept: int
    cx: float  # object centre, relative to the canvas
    cy: float
    scale: float  # object circumradius relative to half the image size
    angle: float  # degrees
    bg: int  # index into BACKGROUNDS (or SHIFT_BACKGROUNDS when shift)
    bg_kind: int
    noise: float  # gaussian noise sigma, 0..255 units
    blur: float  # gaussian blur radius in px (0 = none)
    render_seed: int
    face: tuple[float, ...] = ()  # relative (x1, y1, x2, y2) of a face-like drawing, or ()
    degrade: int = 0  # >0: the original's shorter side; rendered at that resolution and upscaled
    crop: float = 1.0  # >1: the centre crop of a banner this many times longer than wide
    crop_tall: bool = False
    jitter_seed: int = 0  # >0: a near-duplicate, shifted/re-lit/re-encoded with this seed
    shift: bool = False  # draw from SHIFT_BACKGROUNDS


SCENE_FIELDS = tuple(Scene.__dataclass_fields__)


def render(scene: Scene, concept: Concept, size: int = IMAGE_SIZE):
    """Draw one scene as a ``size`` x ``size`` RGB PIL image (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(scene.render_seed)
    long_side = round(size * min(scene.crop, 6.0))
    h, w = (long_side, size) if scene.crop_tall else (size, long_side)
    palette = SHIFT_BACKGROUNDS if scene.shift else BACKGROUNDS
    canvas = _background(rng, h, w, list(palette.values())[scene.bg], scene.bg_kind, scene.shift)
    _draw_object(canvas, rng, scene, concept, size)
    top, left = (h - size) // 2, (w - size) // 2
    img = Image.fromarray(np.clip(canvas[top : top + size, left : left + size], 0, 255).astype(np.uint8))
    if scene.face:
        _draw_face(img, rng, scene.face)
    return _finish(img, rng, scene, size)


def _background(rng: np.random.Generator, h: int, w: int, rgb, kind: int, strong: bool) -> np.ndarray:
    """A (h, w, 3) float32 background: plain, gradient, mottled (low-frequency noise) or grain.

    ``strong``: the shifted eval style (mottling of twice the contrast).
    """
    base = np.asarray(rgb, np.float32) * rng.uniform(0.93, 1.05, 3).astype(np.float32)
    if kind == BG_PLAIN:
        return np.broadcast_to(base, (h, w, 3)).copy()
    xx, yy = _grid(h, w)
    if kind == BG_GRADIENT:
        a = rng.uniform(0, 2 * math.pi)
        t = ((xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)) / max(h, w)
        return base * (1 + rng.uniform(0.25, 0.45) * t)[..., None]
    if kind == BG_GRAIN:
        a = rng.uniform(0, math.pi)
        u = (xx * math.cos(a) + yy * math.sin(a)) / rng.uniform(2.5, 5)
        field = np.sin(u + 1.5 * np.sin(yy / 7 + rng.uniform(0, 6)))
        return base * (1 + 0.22 * field)[..., None]
    return base * (1 + (0.35 if strong else 0.15) * _low_frequency(rng, h, w))[..., None]


def _low_frequency(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a 4-row grid of random values, bicubically upsampled to (h, w)."""
    from PIL import Image

    cells = rng.uniform(-1, 1, (4, max(4, 4 * w // h)))
    small = Image.fromarray(((cells + 1) * 127.5).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) / 127.5 - 1


def _draw_object(
    canvas: np.ndarray, rng: np.random.Generator, scene: Scene, concept: Concept, size: int
) -> None:
    """Composite the concept's shape, filled with its texture, onto ``canvas`` in place.

    Only the object's bounding box is touched (drawn at 2x and box-filtered for anti-aliasing).
    """
    from PIL import Image, ImageDraw

    h, w = canvas.shape[:2]
    radius = scene.scale * size / 2
    cx, cy = scene.cx * w, scene.cy * h
    a = math.radians(scene.angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    pts = (POLYGONS[concept.shape] @ rot) * radius + (cx, cy)
    x0, y0 = (max(0, math.floor(v) - 1) for v in pts.min(axis=0))
    x1, y1 = min(w, math.ceil(pts[:, 0].max()) + 2), min(h, math.ceil(pts[:, 1].max()) + 2)
    fill = np.asarray(COLOURS[concept.colour], np.float32) * rng.uniform(0.9, 1.08, 3).astype(np.float32)
    fill = np.clip(fill, 0, 255)
    phases = rng.uniform(0, 1, 3)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", (2 * (x1 - x0), 2 * (y1 - y0)), 0)
    flat = (2 * (pts - (x0, y0))).ravel().tolist()
    if concept.texture == "outlined":
        ImageDraw.Draw(mask).polygon(flat, outline=255, width=max(3, round(0.5 * radius)))
    else:
        ImageDraw.Draw(mask).polygon(flat, fill=255)
    alpha = np.asarray(mask.reduce(2), np.float32)[..., None] * np.float32(1 / 255)
    xx, yy = _grid(h, w)
    box = (slice(y0, y1), slice(x0, x1))
    tex = _texture(
        xx[box] - cx, yy[box] - cy, concept.texture, fill, a, radius * (0.42 + 0.18 * phases[0]), phases[1:]
    )
    region = canvas[box]
    region += alpha * (tex - region)


def _texture(dx: np.ndarray, dy: np.ndarray, texture: str, fill: np.ndarray, a: float, period: float, phase):
    """The fill of the object: solid, stripes, dots or checks in the fill colour and a light tint.

    ``dx, dy`` are pixel offsets from the object's centre; the pattern turns with the object.
    """
    if texture in ("solid", "outlined"):
        return fill
    period = max(3.0, period)
    c, s = math.cos(a) / period, math.sin(a) / period
    pu = dx * c + dy * s + phase[0]
    if texture == "striped":
        pat = (pu % 1.0) < 0.5
    else:
        pv = dy * c - dx * s + phase[1]
        if texture == "dotted":
            pat = ((pu % 1.0) - 0.5) ** 2 + ((pv % 1.0) - 0.5) ** 2 < 0.08
        else:  # checkered
            pat = (np.floor(pu) + np.floor(pv)) % 2 == 0
    tint = 0.4 * fill + 0.6 * 250.0
    return np.where(pat[..., None], tint, fill).astype(np.float32)


def _draw_face(img, rng: np.random.Generator, box: Sequence[float]) -> None:
    """A face-like drawing (skin oval, two eyes, a mouth) in the relative box, in place."""
    from PIL import ImageDraw

    s = img.size[0]
    x1, y1, x2, y2 = (v * s for v in box)
    skin = [(241, 194, 160), (224, 172, 125), (198, 134, 90), (141, 85, 36), (255, 219, 172)]
    d = ImageDraw.Draw(img)
    d.ellipse([x1, y1, x2, y2], fill=skin[int(rng.integers(len(skin)))])
    fw, fh = x2 - x1, y2 - y1
    er = max(1.0, 0.09 * fw)
    for ex in (x1 + 0.32 * fw, x1 + 0.68 * fw):
        ey = y1 + 0.4 * fh
        d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(35, 25, 20))
    d.arc(
        [x1 + 0.3 * fw, y1 + 0.5 * fh, x2 - 0.3 * fw, y1 + 0.8 * fh],
        20,
        160,
        fill=(150, 40, 40),
        width=max(1, round(0.05 * fw)),
    )


def _finish(img, rng: np.random.Generator, scene: Scene, size: int):
    """Resolution loss (tiny originals), blur, sensor noise and near-duplicate jitter."""
    from PIL import Image, ImageFilter

    if 0 < scene.degrade < size:
        img = img.resize((scene.degrade, scene.degrade), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    if scene.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(scene.blur))
    if scene.noise > 0:
        arr = np.asarray(img, np.float32) + _noise_patch(rng, size) * np.float32(scene.noise)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if scene.jitter_seed:
        img = _jitter(img, np.random.default_rng(scene.jitter_seed), size)
    return img


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of standard normals; images take random windows of it (much faster than drawing)."""
    return np.random.default_rng(20240611).standard_normal((256, 256, 3), np.float32)


def _noise_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size x 3 window of the noise bank at a random offset, randomly flipped/transposed."""
    bank = _noise_bank()
    y, x = (int(v) for v in rng.integers(0, bank.shape[0] - size + 1, 2))
    patch = bank[y : y + size, x : x + size]
    flip = int(rng.integers(4))
    return patch.transpose(1, 0, 2) if flip & 1 else patch[::-1] if flip & 2 else patch


def _jitter(img, rng: np.random.Generator, size: int):
    """A near-duplicate: a slightly shifted crop, rescaled, with a small brightness change."""
    from PIL import Image

    m = int(rng.integers(2, 6))
    dx, dy = (int(v) for v in rng.integers(0, m + 1, 2))
    img = img.crop((dx, dy, dx + size - m, dy + size - m)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, np.float32) * rng.uniform(0.9, 1.1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode_image(img, fmt: str = "JPEG", quality: int = JPEG_QUALITY) -> bytes:
    """Encode a PIL image as bytes (deterministic for the same pixels and settings)."""
    buf = io.BytesIO()
    if fmt == "WEBP":
        img.save(buf, format=fmt, quality=quality, method=0)  # method 0: ~5x faster, same quality
    else:
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def scene_jpeg(scene: Scene, concept: Concept) -> bytes:
    """The stored JPEG of a scene: near-duplicates are re-encoded at a lower quality."""
    quality = JPEG_QUALITY if not scene.jitter_seed else 70 + scene.jitter_seed % 15
    return encode_image(render(scene, concept), "JPEG", quality)


# --------------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    """The English indefinite article for the phrase starting with ``word``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def position_words(cx: float, cy: float) -> str:
    """Where the object is: "in the top left corner", "at the bottom", "in the center", ..."""
    v = "top" if cy < 0.44 else "bottom" if cy > 0.56 else ""
    h = "left" if cx < 0.44 else "right" if cx > 0.56 else ""
    if v and h:
        return f"in the {v} {h} corner"
    if v:
        return f"at the {v}"
    return f"on the {h}" if h else "in the center"


def size_word(scale: float) -> str:
    """ "small", "large" or "" (medium) for an object scale."""
    return "small" if scale < 0.5 else "large" if scale > 0.66 else ""


def english_phrase(r: random.Random, c: Concept, size: str = "") -> str:
    """The concept in words, in one of several forms ("red striped triangle", "red triangle with stripes")."""
    colour = r.choice(EN_COLOUR.get(c.colour, [c.colour]))
    shape = r.choice(EN_SHAPE[c.shape])
    lead = f"{size} {colour}" if size else colour
    if c.texture != "solid" and r.random() < 0.35:
        return f"{lead} {shape} with {r.choice(EN_TEX_WITH[c.texture])}"
    adj = r.choice(EN_TEX_ADJ[c.texture])
    return (
        " ".join(w for w in (size, adj, colour, shape) if w)
        if adj and r.random() < 0.3
        else " ".join(w for w in (lead, adj, shape) if w)
    )


def english_caption(r: random.Random, c: Concept, scene: Scene, *, detail: float = 0.35) -> str:
    """An English caption of a scene: a template, sometimes size/position/background and extra words."""
    size = size_word(scene.scale) if r.random() < detail else ""
    p = english_phrase(r, c, size)
    if r.random() < detail:
        p += " " + position_words(scene.cx, scene.cy)
    if r.random() < detail and not scene.shift:
        p += f" on {_a(list(BACKGROUNDS)[scene.bg])} {list(BACKGROUNDS)[scene.bg]} background"
    t = r.choice(EN_TEMPLATES)
    text = t.format(a=_a(p), A=_a(p).capitalize(), p=p)
    if r.random() < 0.15:
        text = r.choice(EN_PREFIXES) + text
    if r.random() < 0.2:
        text += r.choice(EN_SUFFIXES)
    return text


def foreign_caption(r: random.Random, lang: str, c: Concept, scene: Scene) -> str:
    """A caption of the scene in German, French, Spanish or Italian."""
    v = FOREIGN[lang]
    noun, gender = v["shape"][c.shape]
    colour = v["colour"][c.colour]
    if lang == "de":
        p = f"{noun} in {colour}{v['texture'][c.texture]}"
        art = "ein"
    else:
        adj = colour[0] if gender == "m" else colour[1]
        p = f"{noun} {adj}{v['texture'][c.texture]}"
        art = v["article"][gender]
    bg = v["bg"][list(BACKGROUNDS)[scene.bg]]
    return r.choice(v["templates"]).format(p=p, art=art, bg=bg)


def junk_caption(r: random.Random) -> str:
    """Alt-text with nothing to learn from: file names, UI strings, sizes."""
    n = r.randrange(10000)
    forms = (
        lambda: f"IMG_{n:04d}.jpg",
        lambda: f"DSC{n:05d}.JPG",
        lambda: f"2019{r.randrange(1, 13):02d}{r.randrange(1, 29):02d}_{r.randrange(240000):06d}.jpg",
        lambda: f"untitled-{r.randrange(1, 20)}",
        lambda: f"{r.choice((640, 800, 1024, 1920))}x{r.choice((480, 600, 768, 1080))}",
        lambda: f"Screenshot 2021-0{n % 9 + 1}-1{n % 10} at {n % 12 + 1}.{n % 60:02d}.{n % 59:02d}",
        lambda: f"product image {r.randrange(1, 6)} of {r.randrange(6, 12)}",
        lambda: f"page {r.randrange(1, 40)}",
        lambda: f"image{n % 100}.png",
        lambda: r.choice(JUNK_FIXED),
        lambda: r.choice(JUNK_FIXED),
        lambda: r.choice(JUNK_FIXED),
    )
    return r.choice(forms)()


def _url(r: random.Random, caption: str, defect: str) -> str:
    """A plausible image url on a reserved example domain (junk file-name captions reuse the name)."""
    host = r.choice(HOSTS)
    if defect == "junk" and caption.lower().endswith((".jpg", ".png")):
        name = caption.replace(" ", "_")
    else:
        name = f"{r.getrandbits(48):012x}.jpg"
    return (
        f"https://{host}/{r.choice(URL_FOLDERS)}/"
        f"{r.randrange(2012, 2024)}/{r.randrange(1, 13):02d}/{name}"
    )


# ------------------------------------------------------------------------------------- plan


def _uids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 32-hex-character uids."""
    while True:
        words = rng.integers(0, 2**64, size=(n, 2), dtype=np.uint64)
        uids = [f"{int(a):016x}{int(b):016x}" for a, b in words]
        if len(set(uids)) == n:
            return uids


def _draw_scenes(
    rng: np.random.Generator, concept: np.ndarray, *, shift: bool = False
) -> dict[str, np.ndarray]:
    """Vectorised scene parameters for ``len(concept)`` images (training or shifted style)."""
    n = len(concept)
    if shift:
        scale = np.where(rng.random(n) < 0.7, rng.uniform(0.26, 0.42, n), rng.uniform(0.8, 0.92, n))
        bg = rng.integers(0, len(SHIFT_BACKGROUNDS), n)
        bg_kind = rng.choice([BG_MOTTLED, BG_GRAIN], n)
        noise = rng.uniform(12, 28, n)
        blur = np.where(rng.random(n) < 0.5, rng.uniform(0.5, 1.1, n), 0.0)
    else:
        scale = rng.uniform(0.38, 0.78, n)
        bg = rng.integers(0, len(BACKGROUNDS), n)
        bg_kind = rng.choice([BG_PLAIN, BG_GRADIENT, BG_MOTTLED], n, p=[0.4, 0.35, 0.25])
        noise = rng.uniform(0, 10, n)
        blur = np.where(rng.random(n) < 0.2, rng.uniform(0.3, 0.8, n), 0.0)
    room = np.clip(0.5 - scale / 2, 0, None) * 0.9
    return {
        "concept": concept.astype(np.int64),
        "cx": 0.5 + rng.uniform(-1, 1, n) * room,
        "cy": 0.5 + rng.uniform(-1, 1, n) * room,
        "scale": scale,
        "angle": rng.uniform(0, 360, n),
        "bg": bg,
        "bg_kind": bg_kind,
        "noise": noise,
        "blur": blur,
        "render_seed": rng.integers(1, 2**62, n),
    }


def _scenes(params: dict[str, np.ndarray], **fixed) -> list[Scene]:
    """Scene objects from column arrays (plus fields fixed for all of them)."""
    n = len(params["concept"])
    cols = {k: v.tolist() for k, v in params.items()}
    return [Scene(**{k: cols[k][i] for k in cols}, **fixed) for i in range(n)]


def _assign_defects(rng: np.random.Generator, n: int, rates: Mapping[str, float]) -> np.ndarray:
    """Exactly round(rate * n) rows per defect, at random positions; the rest are "none"."""
    labels = np.full(n, "none", dtype=object)
    start = 0
    for name in DEFECTS[1:]:
        k = round(rates.get(name, 0.0) * n)
        labels[start : start + k] = name
        start += k
    return labels[rng.permutation(n)]


def _original_sizes(
    rng: np.random.Generator, defect: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original_width, original_height, aspect) per row; tiny and extreme rows break basic_filter."""
    n = len(defect)
    short = np.exp(rng.uniform(math.log(200), math.log(1600), n))
    aspect = np.exp(rng.uniform(0, math.log(2.2), n))
    tiny = defect == "tiny"
    short[tiny] = np.exp(rng.uniform(math.log(16), math.log(190), int(tiny.sum())))
    ext = defect == "extreme_aspect"
    aspect[ext] = np.exp(rng.uniform(math.log(3.3), math.log(8), int(ext.sum())))
    short[ext] = np.exp(rng.uniform(math.log(200), math.log(700), int(ext.sum())))
    long = np.maximum(short, np.round(short * aspect))
    short = np.round(short)
    wide = rng.random(n) < 0.6
    width = np.where(wide, long, short).astype(np.int64)
    height = np.where(wide, short, long).astype(np.int64)
    return width, height, aspect


def _face_boxes(rng: np.random.Generator, n: int, eligible: np.ndarray) -> list[tuple[float, ...]]:
    """A relative (x1, y1, x2, y2) face box for FACE_RATE of the eligible rows, () for the others."""
    has = (rng.random(n) < FACE_RATE) & eligible
    w = rng.uniform(0.18, 0.3, n)
    h = w * 1.25
    x1 = rng.uniform(0, 1, n) * (1 - w)
    y1 = rng.uniform(0, 1, n) * (1 - h)
    return [
        (
            round(float(x1[i]), 4),
            round(float(y1[i]), 4),
            round(float(x1[i] + w[i]), 4),
            round(float(y1[i] + h[i]), 4),
        )
        if has[i]
        else ()
        for i in range(n)
    ]


def _apply_variants(rng, scenes: list[Scene], defect: np.ndarray, width, height, aspect) -> None:
    """Faces, resolution loss of tiny originals and banner crops of extreme-aspect ones, in place."""
    along = rng.uniform(0.08, 0.92, len(scenes))
    faces = _face_boxes(rng, len(scenes), defect != "extreme_aspect")
    for i, s in enumerate(scenes):
        s.face = faces[i]
        if defect[i] == "tiny":
            s.degrade = int(min(width[i], height[i]))
        elif defect[i] == "extreme_aspect":
            s.crop, s.crop_tall = float(aspect[i]), bool(height[i] > width[i])
            s.cx, s.cy = (s.cx, float(along[i])) if s.crop_tall else (float(along[i]), s.cy)


def plan_pool(concepts: Sequence[Concept], n: int, seed: int, rates: Mapping[str, float]) -> dict[str, list]:
    """Every pool row (ground truth, metadata and scene), as columns of equal length ``n``."""
    rng = _rng(seed, "pool")
    k = len(concepts)
    weights = (np.arange(k) + 1.0) ** -CONCEPT_SKEW
    weights = weights[rng.permutation(k)] / weights.sum()
    concept = rng.choice(k, size=n, p=weights)
    defect = _assign_defects(rng, n, rates)
    params = _draw_scenes(rng, concept)
    width, height, aspect = _original_sizes(rng, defect)
    scenes = _scenes(params)
    _apply_variants(rng, scenes, defect, width, height, aspect)
    dup_of = _link_duplicates(rng, defect, scenes, concept, width, height)
    r = random.Random(int(rng.integers(2**62)))
    text_concept = concept.copy()
    mism = defect == "mismatched"
    text_concept[mism] = (concept[mism] + rng.integers(1, k, int(mism.sum()))) % k
    lang = np.where(defect == "non_english", rng.choice(LANGUAGES, n), "en").astype(object)
    lang[defect == "junk"] = ""
    text_concept[defect == "junk"] = -1
    texts = _captions(r, concepts, scenes, defect, text_concept, lang, dup_of)
    downloaded = rng.random(n) >= FAILED_RATE
    uids = _uids(rng, n)
    return {
        "uid": uids,
        "url": [_url(r, t, d) for t, d in zip(texts, defect)],
        "text": texts,
        "original_width": width.tolist(),
        "original_height": height.tolist(),
        "face_bboxes": [[list(s.face)] if s.face else [] for s in scenes],
        "concept": concept.tolist(),
        "concept_name": [concepts[j].name for j in concept],
        "text_concept": text_concept.tolist(),
        "defect": defect.tolist(),
        "lang": lang.tolist(),
        "duplicate_of": [uids[j] if j >= 0 else None for j in dup_of],
        "downloaded": downloaded.tolist(),
        "error_message": [None if ok else r.choice(DOWNLOAD_ERRORS) for ok in downloaded],
        "scene": scenes,
    }


def _link_duplicates(
    rng, defect: np.ndarray, scenes: list[Scene], concept: np.ndarray, width: np.ndarray, height: np.ndarray
) -> np.ndarray:
    """Point each (near-)duplicate at an original row, copying its scene, concept and size (in place).

    Returns the original's row index per row (-1 for rows that are not duplicates).
    """
    n = len(defect)
    dup_of = np.full(n, -1, dtype=np.int64)
    is_dup = np.isin(defect, ["duplicate", "near_duplicate"])
    if not is_dup.any():
        return dup_of
    pool = np.flatnonzero(defect == "none")
    if len(pool) == 0:
        pool = np.flatnonzero(~is_dup)
    if len(pool) == 0:
        raise UsageError(
            "the duplicate and near_duplicate rates leave no original rows to duplicate",
            hint="lower the duplicate rates so that they sum to less than 1",
        )
    for i in np.flatnonzero(is_dup):
        j = int(pool[rng.integers(len(pool))])
        dup_of[i] = j
        scenes[i] = Scene(**asdict(scenes[j]))
        concept[i], width[i], height[i] = concept[j], width[j], height[j]
        if defect[i] == "near_duplicate":
            scenes[i].jitter_seed = int(rng.integers(1, 2**62))
    return dup_of


def _captions(r, concepts, scenes, defect, text_concept, lang, dup_of) -> list[str]:
    """Captions per row; exact duplicates repeat their original's caption."""
    out: list[str] = [""] * len(scenes)
    for i, s in enumerate(scenes):
        if defect[i] == "junk":
            out[i] = junk_caption(r)
        elif defect[i] == "non_english":
            out[i] = foreign_caption(r, lang[i], concepts[text_concept[i]], s)
        elif defect[i] != "duplicate":
            out[i] = english_caption(r, concepts[text_concept[i]], s)
    for i in np.flatnonzero(defect == "duplicate"):
        out[i] = out[dup_of[i]]
    return out


def plan_clean(concepts: Sequence[Concept], n: int, seed: int, stream: str) -> dict[str, list]:
    """Rows with no defect at all (the teacher's split): balanced concepts, English captions."""
    rng = _rng(seed, stream)
    concept = rng.permutation(np.arange(n) % len(concepts))
    scenes = _scenes(_draw_scenes(rng, concept))
    r = random.Random(int(rng.integers(2**62)))
    texts = [english_caption(r, concepts[s.concept], s) for s in scenes]
    width, height, _ = _original_sizes(rng, np.full(n, "none", dtype=object))
    return {
        "uid": _uids(rng, n),
        "url": [_url(r, t, "none") for t in texts],
        "text": texts,
        "original_width": width.tolist(),
        "original_height": height.tolist(),
        "face_bboxes": [[] for _ in range(n)],
        "downloaded": [True] * n,
        "error_message": [None] * n,
        "scene": scenes,
    }


def _slice(plan: Mapping[str, list], lo: int, hi: int) -> dict[str, list]:
    """Rows lo..hi of a plan (dict of equal-length columns)."""
    return {k: v[lo:hi] for k, v in plan.items()}


# ---------------------------------------------------------------------------- shard writers


def key_width(shard_size: int) -> int:
    """img2dataset's key width: oom_shard_count digits of shard id + digits of the sample index."""
    return OOM_SHARD_COUNT + max(0, math.ceil(math.log10(shard_size)))


def _key(shard: int, i: int, shard_size: int) -> str:
    """img2dataset's positional key of sample ``i`` of ``shard``: shard * 10**oom + i, zero-padded."""
    oom = max(0, math.ceil(math.log10(shard_size)))
    return f"{shard * 10**oom + i:0{key_width(shard_size)}d}"


def _write_parquet(path: Path, table) -> None:
    """Write a pyarrow table as parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _render_rows(rows: Mapping[str, list], concepts: Sequence[Concept]) -> list[bytes]:
    """The JPEG bytes of every row (failed downloads too: their sha256 is in the pool metadata)."""
    return [scene_jpeg(s, concepts[s.concept]) for s in rows["scene"]]


def _download_shard(
    folder: Path, shard: int, rows: Mapping[str, list], jpgs: Sequence[bytes], shard_size: int, t0: float
) -> int:
    """Write one img2dataset shard (tar + parquet + _stats.json); returns the successes."""
    samples, meta_rows = [], []
    for i, jpg in enumerate(jpgs):
        key = _key(shard, i, shard_size)
        meta = _sample_meta(rows, i, key)
        if rows["downloaded"][i]:
            meta.update(
                status="success",
                width=IMAGE_SIZE,
                height=IMAGE_SIZE,
                exif="{}",
                sha256=hashlib.sha256(jpg).hexdigest(),
            )
            samples.append(
                {
                    "__key__": key,
                    "jpg": jpg,
                    "txt": rows["text"][i].encode("utf-8"),
                    "json": json.dumps(meta, indent=4).encode("utf-8"),
                }
            )
        meta_rows.append(meta)
    write_samples(folder / f"{shard:08d}.tar", samples)
    _write_parquet(folder / f"{shard:08d}.parquet", _shard_table(meta_rows))
    write_json(folder / f"{shard:08d}_stats.json", _stats(meta_rows, t0))
    return len(samples)


def _sample_meta(rows: Mapping[str, list], i: int, key: str) -> dict[str, Any]:
    """img2dataset's per-sample metadata, as for a failed download (success fills in the rest)."""
    ok = rows["downloaded"][i]
    return {
        "uid": rows["uid"][i],
        "url": rows["url"][i],
        "caption": rows["text"][i],
        "key": key,
        "status": "failed_to_download",
        "error_message": rows["error_message"][i],
        "width": None,
        "height": None,
        "original_width": rows["original_width"][i] if ok else None,
        "original_height": rows["original_height"][i] if ok else None,
        "exif": None,
        "sha256": None,
        "face_bboxes": rows["face_bboxes"][i],
    }


def _shard_table(meta_rows: list[dict[str, Any]]):
    """The img2dataset shard parquet: one row per attempted sample, failures included."""
    import pyarrow as pa

    schema = pa.schema(
        [
            ("uid", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("key", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("original_width", pa.int64()),
            ("original_height", pa.int64()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
            ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ]
    )
    return pa.Table.from_pylist(meta_rows, schema=schema)


def _stats(meta_rows: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """img2dataset's per-shard stats (DataComp's resharder reads ``successes``)."""
    status: dict[str, int] = {}
    for m in meta_rows:
        k = "success" if m["status"] == "success" else m["error_message"]
        status[k] = status.get(k, 0) + 1
    ok = status.get("success", 0)
    t1 = time.time()
    return {
        "count": len(meta_rows),
        "successes": ok,
        "failed_to_download": len(meta_rows) - ok,
        "failed_to_resize": 0,
        "duration": round(t1 - t0, 3),
        "start_time": t0,
        "end_time": t1,
        "status_dict": dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def metadata_table(rows: Mapping[str, list], scores: Mapping[str, Any] | None = None):
    """The DataComp metadata parquet of some rows: exactly DATACOMP_COLUMNS, scores NaN by default."""
    import pyarrow as pa

    n = len(rows["uid"])
    scores = scores or {}
    nan = np.full(n, np.nan, np.float32)
    cols = {
        "uid": pa.array(rows["uid"], pa.string()),
        "url": pa.array(rows["url"], pa.string()),
        "text": pa.array(rows["text"], pa.string()),
        "original_width": pa.array(rows["original_width"], pa.int64()),
        "original_height": pa.array(rows["original_height"], pa.int64()),
        "sha256": pa.array(rows["sha256"], pa.string()),
        "clip_b32_similarity_score": pa.array(scores.get("b32", nan), pa.float32()),
        "clip_l14_similarity_score": pa.array(scores.get("l14", nan), pa.float32()),
        "face_bboxes": pa.array(rows["face_bboxes"], pa.list_(pa.list_(pa.float64()))),
    }
    return pa.table({c: cols[c] for c in DATACOMP_COLUMNS})


def truth_table(rows: Mapping[str, list]):
    """Ground truth of some pool rows: labels, defects and the scene each image was drawn from."""
    import pyarrow as pa

    scenes = rows["scene"]
    cols = {
        "uid": pa.array(rows["uid"], pa.string()),
        "concept": pa.array(rows["concept"], pa.int16()),
        "concept_name": pa.array(rows["concept_name"], pa.string()),
        "text_concept": pa.array(rows["text_concept"], pa.int16()),
        "defect": pa.array(rows["defect"], pa.string()),
        "lang": pa.array(rows["lang"], pa.string()),
        "duplicate_of": pa.array(rows["duplicate_of"], pa.string()),
        "downloaded": pa.array(rows["downloaded"], pa.bool_()),
        "has_face": pa.array([bool(s.face) for s in scenes], pa.bool_()),
    }
    for f in SCENE_FIELDS:
        if f not in ("concept", "face"):
            cols[f] = pa.array([getattr(s, f) for s in scenes])
    cols["face"] = pa.array([list(s.face) for s in scenes], pa.list_(pa.float64()))
    return pa.table(cols)


def scene_from_truth(row: Mapping[str, Any]) -> Scene:
    """Rebuild a row's Scene from its ``truth/`` record (a dict as pyarrow's to_pylist gives)."""
    kw = {f: row[f] for f in SCENE_FIELDS if f not in ("concept", "face")}
    return Scene(concept=int(row["concept"]), face=tuple(row["face"] or ()), **kw)


def _pool_shard_job(out: str, shard: int, rows: dict[str, list], concepts, shard_size: int) -> dict[str, Any]:
    """One pool shard: the download shard, the metadata parquet (with sha256) and the truth."""
    out, t0 = Path(out), time.time()
    jpgs = _render_rows(rows, concepts)
    ok = _download_shard(out / "shards", shard, rows, jpgs, shard_size, t0)
    rows = dict(rows, sha256=[hashlib.sha256(j).hexdigest() for j in jpgs])
    _write_parquet(out / "metadata" / f"{shard:08d}.parquet", metadata_table(rows))
    _write_parquet(out / "truth" / f"{shard:08d}.parquet", truth_table(rows))
    return {"job": "pool", "shard": shard, "rows": len(jpgs), "successes": ok}


def _teacher_shard_job(
    out: str, shard: int, rows: dict[str, list], concepts, shard_size: int
) -> dict[str, Any]:
    """One shard of the clean teacher split, in the same img2dataset layout."""
    t0 = time.time()
    jpgs = _render_rows(rows, concepts)
    ok = _download_shard(Path(out) / "teacher" / "shards", shard, rows, jpgs, shard_size, t0)
    return {"job": "teacher", "shard": shard, "rows": len(jpgs), "successes": ok}


# ------------------------------------------------------------------------------- eval tasks

EVAL_TASKS: dict[str, dict[str, Any]] = vocabulary("eval")["tasks"]


def _eval_job(out: str, task: str, concepts: list[Concept], seed: int, per_class: int, n_retrieval: int):
    """Render and write one eval task in the clip_benchmark webdataset layout."""
    rng = _rng(seed, f"eval/{task}")
    folder = Path(out) / "eval" / task
    (folder / "test").mkdir(parents=True, exist_ok=True)
    if task == "retrieval":
        samples = _retrieval_samples(rng, concepts, n_retrieval)
    else:
        classes, samples = _classification_samples(rng, task, concepts, per_class)
        _write_text(folder / "classnames.txt", "\n".join(classes) + "\n")
        _write_text(folder / "zeroshot_classification_templates.txt", "\n".join(EVAL_TEMPLATES) + "\n")
    write_samples(folder / "test" / "0.tar", samples)
    _write_text(folder / "test" / "nshards.txt", "1\n")
    return {"job": "eval", "task": task, "size": len(samples)}


def _classification_samples(rng, task: str, concepts: list[Concept], per_class: int):
    """(class names, webdataset samples with .webp and .cls) for a classification task."""
    if task == "shapes":
        palette = [Concept(i, *c) for i, c in enumerate(itertools.product(SHAPES, COLOURS, TEXTURES))]
        labels = np.repeat(np.arange(len(SHAPES)), per_class)
        drawn = np.array([SHAPES.index(palette[j].shape) for j in range(len(palette))])
        which = np.array([rng.choice(np.flatnonzero(drawn == lab)) for lab in labels])
        classes = list(SHAPES)
    else:
        palette = concepts
        labels = np.repeat(np.arange(len(concepts)), per_class)
        which = labels
        classes = [c.name for c in concepts]
    order = rng.permutation(len(labels))
    labels, which = labels[order], which[order]
    scenes = _scenes(_draw_scenes(rng, which, shift=task == "concepts_shift"), shift=task == "concepts_shift")
    samples = [
        {
            "__key__": f"s{i:07d}",
            "webp": encode_image(render(s, palette[s.concept]), "WEBP", 90),
            "cls": str(int(labels[i])).encode(),
        }
        for i, s in enumerate(scenes)
    ]
    return classes, samples


def _retrieval_samples(rng, concepts: list[Concept], n: int) -> list[dict[str, Any]]:
    """Webdataset samples with .webp and .txt (two detailed captions, one per line)."""
    which = rng.integers(0, len(concepts), n)
    scenes = _scenes(_draw_scenes(rng, which))
    r = random.Random(int(rng.integers(2**62)))
    out = []
    for i, s in enumerate(scenes):
        caps = [retrieval_caption(r, concepts[s.concept], s) for _ in range(2)]
        out.append(
            {
                "__key__": f"s{i:07d}",
                "webp": encode_image(render(s, concepts[s.concept]), "WEBP", 90),
                "txt": "\n".join(caps).encode("utf-8"),
            }
        )
    return out


def retrieval_caption(r: random.Random, c: Concept, scene: Scene) -> str:
    """A caption that pins the image down: size, concept, position and background."""
    p = english_phrase(r, c, size_word(scene.scale))
    bg = list(BACKGROUNDS)[scene.bg]
    p = f"{p} {position_words(scene.cx, scene.cy)} on {_a(bg)} {bg} background"
    return r.choice(EN_TEMPLATES[:8]).format(a=_a(p), A=_a(p).capitalize(), p=p)


def _write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _tasklist(sizes: Mapping[str, int], concepts: list[Concept]) -> dict[str, Any]:
    """eval/tasklist.json: like DataComp's tasklist.yml, plus each task's type."""
    out = {}
    for task, spec in EVAL_TASKS.items():
        entry = dict(spec, size=int(sizes[task]))
        if spec["type"] == "zeroshot_classification":
            k = len(SHAPES) if task == "shapes" else len(concepts)
            entry.update(num_classes=k, random_score=round(1.0 / k, 6))
        out[task] = entry
    return out


# ------------------------------------------------------------------------------------ build


def check_rates(rates: Mapping[str, float] | None) -> dict[str, float]:
    """DEFAULT_RATES updated with ``rates``; each in [0, 1], summing to at most 1."""
    merged = dict(DEFAULT_RATES)
    for name, value in (rates or {}).items():
        if name not in DEFAULT_RATES:
            raise UsageError(f"unknown defect {name!r}", hint=f"choose from {', '.join(DEFAULT_RATES)}")
        if not 0.0 <= float(value) <= 1.0:
            raise UsageError(
                f"defect rate {name}={value} is outside [0, 1]", hint="give a fraction of the pool"
            )
        merged[name] = float(value)
    if sum(merged.values()) > 1.0 + 1e-9:
        raise UsageError(
            f"defect rates sum to {sum(merged.values()):.3f} > 1",
            hint="lower some rates so they sum to at most 1",
        )
    return merged


def _check_sizes(samples: int, shard_size: int, teacher_samples: int, per_class: int, retrieval: int) -> None:
    """Every size argument at least its minimum, else a UsageError naming it."""
    for name, v, lo in (
        ("samples", samples, 1),
        ("shard_size", shard_size, 1),
        ("teacher_samples", teacher_samples, 0),
        ("eval_per_class", per_class, 1),
        ("retrieval_samples", retrieval, 1),
    ):
        if int(v) < lo:
            raise UsageError(f"{name} must be at least {lo}, got {v}", hint=f"pass a {name} of {lo} or more")


def build_world(
    out: str | os.PathLike,
    *,
    concepts: int = 40,
    samples: int = 60_000,
    seed: int = 0,
    shard_size: int = SHARD_SIZE,
    teacher_samples: int | None = None,
    eval_per_class: int = 25,
    retrieval_samples: int = 500,
    rates: Mapping[str, float] | None = None,
    workers: int | None = None,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Build the demo world in ``out`` (see the module docstring) and return its manifest.

    ``teacher_samples`` defaults to a third of ``samples`` (at least 1,000); ``rates`` overrides
    entries of ``DEFAULT_RATES``; ``workers`` defaults to min(2, cores) processes (small worlds are
    built in-process). The output is identical for the same arguments, whatever ``workers`` is.
    """
    t0 = time.perf_counter()
    teacher_samples = max(1000, samples // 3) if teacher_samples is None else int(teacher_samples)
    _check_sizes(samples, shard_size, teacher_samples, eval_per_class, retrieval_samples)
    merged = check_rates(rates)
    cs = make_concepts(concepts, seed)
    out = prepare_folder(  # with force, only what a world consists of goes
        Path(out).expanduser(), force=force, what="world output", clear=lambda p: p.name in LAYOUT,
        not_empty="choose an empty folder or pass --force to replace it",
        subfolders=("metadata", "truth", "shards", "teacher/shards", "eval"),
    )
    pool = plan_pool(cs, samples, seed, merged)
    teacher = plan_clean(cs, teacher_samples, seed, "teacher")
    jobs = _jobs(out, cs, pool, teacher, seed, shard_size, eval_per_class, retrieval_samples)
    results = _run_jobs(jobs, _n_workers(workers, samples + teacher_samples), progress)
    manifest = _manifest(
        cs,
        pool,
        results,
        seed=seed,
        shard_size=shard_size,
        rates=merged,
        teacher_samples=teacher_samples,
        seconds=time.perf_counter() - t0,
    )
    write_json(out / "eval" / "tasklist.json", _tasklist(manifest["eval"], cs))
    write_json(out / MANIFEST, manifest)
    return manifest


def _jobs(out: Path, cs, pool, teacher, seed, shard_size, per_class, n_retrieval) -> list[tuple]:
    """(function, args) per unit of work, biggest first."""
    jobs = []
    for kind, plan, fn in (("pool", pool, _pool_shard_job), ("teacher", teacher, _teacher_shard_job)):
        n = len(plan["uid"])
        for shard, lo in enumerate(range(0, n, shard_size)):
            jobs.append((fn, (str(out), shard, _slice(plan, lo, lo + shard_size), cs, shard_size)))
    for task in EVAL_TASKS:
        jobs.append((_eval_job, (str(out), task, cs, seed, per_class, n_retrieval)))
    return sorted(jobs, key=lambda j: -_job_size(j))


def _job_size(job: tuple) -> int:
    """Images a job renders (to schedule the biggest first)."""
    fn, args = job
    return len(args[2]["uid"]) if fn is not _eval_job else args[4] * len(args[2])


def _n_workers(workers: int | None, total: int) -> int:
    """Worker processes: as asked, else up to 2 for worlds big enough to repay starting them."""
    if workers is not None:
        if workers < 1:
            raise UsageError(f"workers must be at least 1, got {workers}", hint="pass 1 or more")
        return workers
    return 1 if total < 2000 else max(1, min(2, os.cpu_count() or 1))


def _run_jobs(jobs: list[tuple], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Run the jobs in-process (1 worker) or on worker processes (dcdb.parallel); show a progress
    bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="world", unit="part", disable=not progress, leave=False)
    try:
        done = parallel.as_completed(_run_job, jobs, workers, progress=lambda job, result: bar.update(),
                                     on_death=_worker_died)
        return [result for _job, result in done]
    finally:
        bar.close()


def _run_job(job: tuple) -> dict[str, Any]:
    fn, args = job
    return fn(*args)


def _worker_died(job: tuple) -> WorkerError:
    return WorkerError(
        "a world worker process died before finishing",
        hint="call build_world under `if __name__ == '__main__':` in scripts (workers are spawned), "
        "or pass workers=1 (-j 1); check free memory",
    )


def _manifest(cs, pool, results, *, seed, shard_size, rates, teacher_samples, seconds) -> dict[str, Any]:
    """world.json: what was built, with counts per defect, so the demo can report ground truth."""
    pool_shards = sorted((r for r in results if r["job"] == "pool"), key=lambda r: r["shard"])
    teacher_shards = sorted((r for r in results if r["job"] == "teacher"), key=lambda r: r["shard"])
    sizes = {r["task"]: r["size"] for r in results if r["job"] == "eval"}
    defects = {d: 0 for d in DEFECTS}
    for d in pool["defect"]:
        defects[d] += 1
    return {
        "format": WORLD_FORMAT,
        "format_version": WORLD_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "samples": len(pool["uid"]),
        "shard_size": shard_size,
        "key_width": key_width(shard_size),
        "concepts": [
            {"id": c.id, "name": c.name, "shape": c.shape, "colour": c.colour, "texture": c.texture}
            for c in cs
        ],
        "rates": dict(rates, failed_to_download=FAILED_RATE, face=FACE_RATE),
        "counts": {
            "defect": defects,
            "failed_to_download": sum(not ok for ok in pool["downloaded"]),
            "faces": sum(bool(f) for f in pool["face_bboxes"]),
        },
        "pool": {
            "metadata": [f"metadata/{r['shard']:08d}.parquet" for r in pool_shards],
            "truth": [f"truth/{r['shard']:08d}.parquet" for r in pool_shards],
            "shards": [f"shards/{r['shard']:08d}.tar" for r in pool_shards],
            "rows": [r["rows"] for r in pool_shards],
            "successes": [r["successes"] for r in pool_shards],
        },
        "teacher": {
            "samples": teacher_samples,
            "shards": [f"teacher/shards/{r['shard']:08d}.tar" for r in teacher_shards],
        },
        "eval": {t: sizes[t] for t in EVAL_TASKS if t in sizes},
        "embeddings": {},
        "build_seconds": round(seconds, 2),
    }


# ------------------------------------------------------------------------- reading a world


def load_world(world_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a world built by build_world, or SourceError saying what to do."""
    path = Path(world_dir) / MANIFEST
    if not path.is_file():
        raise SourceError(
            f"{str(world_dir)!r} is not a dcdb world (no {MANIFEST})",
            hint="build one with `dcdb world DIR` (an interrupted build has no manifest: rerun with --force)",
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != WORLD_FORMAT:
        raise SourceError(
            f"{str(path)!r} is not a dcdb world manifest", hint="give the folder `dcdb world` wrote"
        )
    return manifest


def world_concepts(manifest: Mapping[str, Any]) -> list[Concept]:
    """The Concept objects of a world, from its manifest."""
    return [Concept(c["id"], c["shape"], c["colour"], c["texture"]) for c in manifest["concepts"]]


def read_truth(world_dir: str | os.PathLike):
    """The ground truth of the whole pool as one pyarrow Table (row order = metadata order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = load_world(world_dir)
    return pa.concat_tables([pq.read_table(Path(world_dir) / p) for p in manifest["pool"]["truth"]])


def pool_images(world_dir: str | os.PathLike, shard: int) -> Iterator[tuple[str, Any]]:
    """(uid, RGB PIL image) for every row of a metadata shard, in row order.

    Downloaded rows come from the shard's tar (the bytes a user trains on); rows whose download
    failed (or all rows, if the tar is gone) are re-rendered from their scene: identical bytes, as
    ``sha256`` in the metadata shows.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    world_dir = Path(world_dir)
    manifest = load_world(world_dir)
    concepts = world_concepts(manifest)
    tar = world_dir / manifest["pool"]["shards"][shard]
    stored = _tar_images(tar) if tar.is_file() else {}
    for row in pq.read_table(world_dir / manifest["pool"]["truth"][shard]).to_pylist():
        jpg = stored.get(row["uid"])
        if jpg is None:
            jpg = scene_jpeg(scene_from_truth(row), concepts[row["concept"]])
        with Image.open(io.BytesIO(jpg)) as im:
            yield row["uid"], im.convert("RGB")


def _tar_images(path: Path) -> dict[str, bytes]:
    """uid -> jpg bytes of an img2dataset tar (the uid comes from each sample's .json)."""
    by_key: dict[str, dict[str, bytes]] = {}
    with TarReader(path) as tar:
        for m in tar.walk():  # a damaged stretch costs its samples: they are re-rendered
            if isinstance(m, Member):
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "json"):
                    by_key.setdefault(key, {})[ext] = tar.read(m)
    return {json.loads(v["json"])["uid"]: v["jpg"] for v in by_key.values() if "jpg" in v and "json" in v}


# ------------------------------------------------------------------------------- embeddings

Encoder = Callable[[Any], Any]


def write_pool_embeddings(
    world_dir: str | os.PathLike,
    encode_images: Encoder | Mapping[str, Encoder],
    encode_texts: Encoder | Mapping[str, Encoder],
    *,
    spaces: Sequence[str] = ("b32", "l14"),
    batch_size: int = 512,
    dtype: str = "float16",
    models: Mapping[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode the pool and write each shard's row-aligned ``.npz`` and CLIP scores.

    ``encode_images`` (a list of PIL images -> (n, d) array) and ``encode_texts`` (a list of str ->
    (n, d)) are one callable for every space or a mapping space -> callable (``spaces`` names them:
    "b32" and "l14" give the npz keys ``b32_img, b32_txt, l14_img, l14_txt``). Vectors are
    L2-normalised and stored as ``dtype``; ``clip_<space>_similarity_score`` becomes the float32
    cosine of the stored pair. ``models`` (space -> model name) is recorded in world.json.
    """
    from tqdm import tqdm

    if dtype not in ("float16", "float32"):
        raise UsageError(f"dtype must be float16 or float32, got {dtype!r}", hint="DataComp ships float16")
    world_dir = Path(world_dir)
    manifest = load_world(world_dir)
    enc_img = _per_space(encode_images, spaces, "encode_images")
    enc_txt = _per_space(encode_texts, spaces, "encode_texts")
    dims: dict[str, int] = {}
    for shard in tqdm(
        range(len(manifest["pool"]["metadata"])), desc="embed", disable=not progress, leave=False
    ):
        dims = _embed_shard(world_dir, manifest, shard, enc_img, enc_txt, batch_size, np.dtype(dtype))
    manifest["embeddings"] = {
        s: {"dim": dims[s], "dtype": dtype, "model": (models or {}).get(s), "keys": [f"{s}_img", f"{s}_txt"]}
        for s in spaces
    }
    write_json(world_dir / MANIFEST, manifest)
    return manifest


def _per_space(enc: Encoder | Mapping[str, Encoder], spaces: Sequence[str], what: str) -> dict[str, Encoder]:
    """One encoder per space, from a single callable or a mapping space -> callable."""
    if isinstance(enc, Mapping):
        missing = [s for s in spaces if s not in enc]
        if missing:
            raise UsageError(
                f"{what} has no encoder for space(s) {', '.join(missing)}",
                hint=f"pass one callable, or a mapping with keys {', '.join(spaces)}",
            )
        return {s: enc[s] for s in spaces}
    if not callable(enc):
        raise UsageError(
            f"{what} must be a callable or a mapping of space -> callable", hint="see write_pool_embeddings"
        )
    return {s: enc for s in spaces}


def _embed_shard(
    world_dir: Path, manifest, shard: int, enc_img, enc_txt, batch_size: int, dtype
) -> dict[str, int]:
    """Encode one metadata shard batch by batch, then write its .npz and rewrite its parquet's scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_path = world_dir / manifest["pool"]["metadata"][shard]
    table = pq.read_table(meta_path)
    texts = table.column("text").to_pylist()
    uids = table.column("uid").to_pylist()
    parts: dict[str, list[np.ndarray]] = {f"{s}_{m}": [] for s in enc_img for m in ("img", "txt")}
    for lo, batch in _batches(pool_images(world_dir, shard), batch_size):
        if [u for u, _ in batch] != uids[lo : lo + len(batch)]:
            raise SourceError(
                f"{meta_path} and its truth/ shard list different uids",
                hint="the world folder was modified: rebuild it with `dcdb world DIR --force`",
            )
        images = [im for _, im in batch]
        for space in enc_img:
            parts[f"{space}_img"].append(_call(enc_img[space], images, f"encode_images[{space!r}]"))
            parts[f"{space}_txt"].append(
                _call(enc_txt[space], texts[lo : lo + len(batch)], f"encode_texts[{space!r}]")
            )
    arrays = {k: _normalise(np.concatenate(v), k).astype(dtype) for k, v in parts.items()}
    for space in enc_img:
        img, txt = arrays[f"{space}_img"], arrays[f"{space}_txt"]
        if img.shape[1] != txt.shape[1]:
            raise UsageError(
                f"space {space!r}: image vectors have {img.shape[1]} dims, text vectors {txt.shape[1]}",
                hint="the two encoders of a space must share one embedding dimension",
            )
        col = f"clip_{space}_similarity_score"
        table = table.set_column(table.column_names.index(col), col, pa.array(cosine(img, txt), pa.float32()))
    with atomic_path(meta_path.with_suffix(".npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    _write_parquet(meta_path, table)
    return {s: int(arrays[f"{s}_img"].shape[1]) for s in enc_img}


def _batches(items: Iterator[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """(offset, list) chunks of an iterator."""
    batch: list[Any] = []
    lo = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield lo, batch
            lo, batch = lo + size, []
    if batch:
        yield lo, batch


def _call(fn: Encoder, batch: list, what: str) -> np.ndarray:
    """Call an encoder on one batch and check that it returned one finite row per input."""
    out = np.asarray(_to_numpy(fn(batch)), dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != len(batch):
        raise UsageError(
            f"{what} returned shape {out.shape} for a batch of {len(batch)}",
            hint="an encoder must return an (n, d) array, one row per input",
        )
    return out


def _normalise(vecs: np.ndarray, what: str) -> np.ndarray:
    """L2-normalise rows (float32); a zero or non-finite row is the encoder's fault."""
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    if not np.all(np.isfinite(vecs)) or np.any(norms == 0):
        raise UsageError(
            f"the encoder of {what} returned a zero or non-finite vector", hint="check the encoder"
        )
    return vecs / norms


def _to_numpy(x):
    """Accept numpy arrays, lists and torch tensors (without importing torch)."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise float32 cosine of two (n, d) arrays."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    num = np.einsum("ij,ij->i", a, b)
    return (num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).astype(np.float32)
