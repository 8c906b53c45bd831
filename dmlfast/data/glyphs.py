"""The built-in ``glyphs`` dataset: characters as classes, font faces (with light jitter) as instances.

Rendered deterministically, offline, from the TrueType files that matplotlib ships
(``matplotlib.get_data_path()/fonts/ttf``):

* faces: DejaVu Sans, DejaVu Serif, DejaVu Sans Mono (4 styles each), STIXGeneral (4 styles) and the
  Computer Modern faces cmr10, cmss10, cmti10, cmtt10, cmmi10 where they cover the character;
* candidate characters: Latin letters and digits, Latin letters without diacritics from the Latin
  Extended and IPA blocks, Greek, Cyrillic, Armenian, Hebrew and a list of symbols (``_CANDIDATES``);
  precomposed letters with diacritics are excluded (they differ from their base letter by a few pixels);
* a face covers a character when its cmap maps it to a glyph that has ink and fits the canvas (so the
  .notdef box is never rendered); for the Computer Modern faces, whose cmaps follow the TeX encodings,
  the glyph name must also equal DejaVu Sans's name for that code point (cmr10 maps U+00A1 to "Gamma");
* characters covered by fewer than ``MIN_FACES`` faces, or whose ink is tiny (dots, commas), are dropped;
* confusables: a character is dropped when its rendering (fixed size and baseline, centred ink) has an
  intersection-over-union of at least ``CONFUSABLE_IOU`` with an already kept character in at least half
  of their shared faces; candidates are visited in code point order, so Latin ``A`` is kept and Greek
  ``Α`` and Cyrillic ``А`` are dropped;
* each (character, face) is rendered ``VARIANTS`` times at ``CANVAS`` px, black on white, with an
  affine jitter (rotation, scale, shear, shift) drawn from a seed derived from (version, code point,
  face, variant);
* classes are split into disjoint train/test halves by the SHA-1 of (version, code point).

The set is written once into ``<cache>/glyphs-<VERSION>/`` (``<cache>`` = ``data_root`` or
``$XDG_CACHE_HOME/dmlfast``, default ``~/.cache/dmlfast``) with a ``manifest.json`` that lists every
image with the SHA-256 of its pixels; later calls only read the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ._common import DatasetLayoutError, DatasetSplits, ImageList

VERSION = "v1"
CANVAS = 64
FONT_SIZE = 36
BASELINE = 46
VARIANTS = 2
MIN_FACES = 12
CONFUSABLE_IOU_CROSS_SCRIPT = 0.8
CONFUSABLE_IOU_SAME_SCRIPT = 0.9
MIN_INK_EXTENT = 0.3  # of FONT_SIZE, the larger of ink width and height

FACES = [
    ("DejaVuSans", "DejaVuSans.ttf"),
    ("DejaVuSans-Bold", "DejaVuSans-Bold.ttf"),
    ("DejaVuSans-Oblique", "DejaVuSans-Oblique.ttf"),
    ("DejaVuSans-BoldOblique", "DejaVuSans-BoldOblique.ttf"),
    ("DejaVuSerif", "DejaVuSerif.ttf"),
    ("DejaVuSerif-Bold", "DejaVuSerif-Bold.ttf"),
    ("DejaVuSerif-Italic", "DejaVuSerif-Italic.ttf"),
    ("DejaVuSerif-BoldItalic", "DejaVuSerif-BoldItalic.ttf"),
    ("DejaVuSansMono", "DejaVuSansMono.ttf"),
    ("DejaVuSansMono-Bold", "DejaVuSansMono-Bold.ttf"),
    ("DejaVuSansMono-Oblique", "DejaVuSansMono-Oblique.ttf"),
    ("DejaVuSansMono-BoldOblique", "DejaVuSansMono-BoldOblique.ttf"),
    ("STIXGeneral", "STIXGeneral.ttf"),
    ("STIXGeneral-Bold", "STIXGeneralBol.ttf"),
    ("STIXGeneral-Italic", "STIXGeneralItalic.ttf"),
    ("STIXGeneral-BoldItalic", "STIXGeneralBolIta.ttf"),
    ("cmr10", "cmr10.ttf"),
    ("cmss10", "cmss10.ttf"),
    ("cmti10", "cmti10.ttf"),
    ("cmtt10", "cmtt10.ttf"),
    ("cmmi10", "cmmi10.ttf"),
]
_TEX_ENCODED = {"cmr10", "cmss10", "cmti10", "cmtt10", "cmmi10"}

_RANGES = [
    (0x0030, 0x0039), (0x0041, 0x005A), (0x0061, 0x007A),  # digits, Latin
    (0x00C0, 0x024F),  # Latin-1 letters, Latin Extended-A/B (letters with diacritics removed below)
    (0x0250, 0x02AF),  # IPA extensions
    (0x0391, 0x03C9), (0x03D0, 0x03F5),  # Greek
    (0x0400, 0x045F), (0x0460, 0x04FF),  # Cyrillic
    (0x0531, 0x0556), (0x0561, 0x0586),  # Armenian
    (0x05D0, 0x05EA),  # Hebrew
]
_SYMBOLS = "#$%&@?!*+=<>/\\()[]{}~^|§¶†‡©®°±×÷¬¿¡¢£¤¥€‰µ∀∂∃∅∇∈∉∏∑√∞∠∧∨∩∪∫≈≠≡≤≥⊂⊃⊆⊇⊕⊗⊥ℵℓ℘ℜℑ№™←↑→↓↔↕⇐⇒⇔■□▲△▼▽◆◇○●★☆♠♣♥♦♪"


def _candidates() -> List[int]:
    cps = set()
    for lo, hi in _RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if cat[0] not in "LN" or unicodedata.decomposition(ch) or cat == "Lm":
                continue
            cps.add(cp)
    cps.update(ord(c) for c in _SYMBOLS)
    return sorted(cps)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dmlfast"


class _Face:
    def __init__(self, name: str, path: Path):
        from matplotlib.ft2font import FT2Font
        from PIL import ImageFont

        self.name = name
        self.font = ImageFont.truetype(str(path), size=FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
        ft = FT2Font(str(path))
        cmap = ft.get_charmap()
        self.cmap = set(cmap)
        self.glyph_names = {cp: ft.get_glyph_name(g) for cp, g in cmap.items()} if name in _TEX_ENCODED or name == "DejaVuSans" else {}

    def draw(self, ch: str) -> Optional[np.ndarray]:
        """Ink (0..1 float, ``CANVAS``²) with fixed baseline and centred ink box, or None if it does not fit."""
        from PIL import Image, ImageDraw

        x0, y0, x1, y1 = self.font.getbbox(ch, anchor="ls")
        if x1 <= x0 or y1 <= y0:
            return None
        x = CANVAS / 2 - (x0 + x1) / 2
        if BASELINE + y0 < 0 or BASELINE + y1 > CANVAS or x1 - x0 > CANVAS - 2:
            return None
        im = Image.new("L", (CANVAS, CANVAS), 0)
        ImageDraw.Draw(im).text((round(x), BASELINE), ch, font=self.font, fill=255, anchor="ls")
        ink = np.asarray(im, dtype=np.float32) / 255.0
        return ink if ink.sum() > 1.0 else None


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def _jitter(ink: np.ndarray, seed: int) -> np.ndarray:
    """Light affine jitter about the canvas centre, bilinear; returns uint8 black-on-white."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(-7.0, 7.0))
    scale = rng.uniform(0.9, 1.08)
    shear = rng.uniform(-0.12, 0.12)
    tx, ty = rng.uniform(-2.5, 2.5, size=2)
    c, s = np.cos(angle), np.sin(angle)
    fwd = scale * np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(fwd)
    centre = np.array([CANVAS / 2, CANVAS / 2])
    offset = centre - inv @ (centre + np.array([tx, ty]))
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    im = Image.fromarray(np.round(ink * 255).astype(np.uint8), "L")
    out = im.transform((CANVAS, CANVAS), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return 255 - np.asarray(out, dtype=np.uint8)


def _load_faces() -> List[_Face]:
    d = font_dir()
    missing = [f for _, f in FACES if not (d / f).is_file()]
    if missing:
        raise DatasetLayoutError(f"glyphs: matplotlib's font folder {d} lacks {missing}; reinstall matplotlib (pip install matplotlib)")
    return [_Face(name, d / f) for name, f in FACES]


def _script(cp: int) -> str:
    ch = chr(cp)
    if unicodedata.category(ch)[0] != "L":
        return "COMMON"
    return unicodedata.name(ch, "UNKNOWN").split()[0]


def select_classes(faces: Sequence[_Face], progress: bool = True) -> Dict[int, List[int]]:
    """``{code point: [indices of the faces that cover it]}`` after coverage, ink and confusable filtering."""
    from dmlfast.progress import progress_bar

    ref_names = next(f for f in faces if f.name == "DejaVuSans").glyph_names
    covered: Dict[int, Dict[int, np.ndarray]] = {}
    for cp in progress_bar(_candidates(), enabled=progress, desc="glyphs: checking font coverage", leave=False):
        inks = {}
        for i, face in enumerate(faces):
            if cp not in face.cmap:
                continue
            if face.name in _TEX_ENCODED and face.glyph_names.get(cp) != ref_names.get(cp):
                continue
            ink = face.draw(chr(cp))
            if ink is not None:
                inks[i] = ink
        if len(inks) < MIN_FACES:
            continue
        ys, xs = np.nonzero(inks[min(inks)] > 0.5)
        if ys.size == 0 or max(np.ptp(ys), np.ptp(xs)) + 1 < MIN_INK_EXTENT * FONT_SIZE:
            continue
        covered[cp] = inks
    cps = sorted(covered)
    iou = _median_iou(cps, covered, len(faces))
    scripts = [_script(cp) for cp in cps]
    kept: List[int] = []
    for j in range(len(cps)):
        limits = [CONFUSABLE_IOU_CROSS_SCRIPT if scripts[i] != scripts[j] else CONFUSABLE_IOU_SAME_SCRIPT for i in kept]
        if not kept or not np.any(iou[kept, j] >= np.array(limits)):
            kept.append(j)
    return {cps[j]: sorted(covered[cps[j]]) for j in kept}


def _median_iou(cps: List[int], covered: Dict[int, Dict[int, np.ndarray]], n_faces: int) -> np.ndarray:
    """Median over shared faces of the IoU of 2x2-pooled ink masks, for all pairs (NaN: no shared face)."""
    n = len(cps)
    size = (CANVAS // 2) ** 2
    ious = np.full((n_faces, n, n), np.nan, dtype=np.float32)
    for f in range(n_faces):
        rows = [k for k, cp in enumerate(cps) if f in covered[cp]]
        if not rows:
            continue
        masks = np.stack([covered[cps[k]][f].reshape(CANVAS // 2, 2, CANVAS // 2, 2).max(axis=(1, 3)) > 0.5 for k in rows])
        m = masks.reshape(len(rows), size).astype(np.float32)
        inter = m @ m.T
        area = m.sum(axis=1)
        ious[f][np.ix_(rows, rows)] = inter / np.maximum(area[:, None] + area[None, :] - inter, 1.0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(ious, axis=0)


def _is_train(cp: int) -> bool:
    return hashlib.sha1(f"{VERSION}:{cp}".encode()).digest()[0] < 128


def render_glyphs(out_dir, codepoints: Optional[Sequence[int]] = None, progress: bool = True) -> dict:
    """Render the glyph set (or only ``codepoints`` of it) into ``out_dir``; returns the manifest.

    Images go to ``out_dir/images/U+XXXX/<face>-<variant>.png``; ``manifest.json`` lists classes
    (code point, split, faces) and images (path, code point, face, variant, SHA-256 of pixels)."""
    from PIL import Image

    from dmlfast.progress import progress_bar

    faces = _load_faces()
    classes = select_classes(faces, progress)
    if codepoints is not None:
        unknown = sorted(set(codepoints) - set(classes))
        if unknown:
            raise ValueError(f"render_glyphs: code points {[f'U+{c:04X}' for c in unknown[:5]]} are not in the glyph set")
        classes = {cp: classes[cp] for cp in sorted(set(codepoints))}
    out_dir = Path(out_dir)
    images = []
    total = sum(len(v) for v in classes.values()) * VARIANTS
    with progress_bar(total=total, enabled=progress, desc="glyphs: rendering", unit="img") as bar:
        for cp, face_ids in classes.items():
            folder = out_dir / "images" / f"U+{cp:04X}"
            folder.mkdir(parents=True, exist_ok=True)
            for fi in face_ids:
                ink = faces[fi].draw(chr(cp))
                for v in range(VARIANTS):
                    pixels = _jitter(ink, _seed(VERSION, cp, faces[fi].name, v))
                    rel = f"images/U+{cp:04X}/{faces[fi].name}-{v}.png"
                    Image.fromarray(pixels, "L").save(out_dir / rel, optimize=False, compress_level=1)
                    images.append({"path": rel, "codepoint": cp, "face": faces[fi].name, "variant": v,
                                   "sha256": hashlib.sha256(pixels.tobytes()).hexdigest()})
                    bar.update(1)
    manifest = {
        "version": VERSION,
        "canvas": CANVAS,
        "faces": [name for name, _ in FACES],
        "classes": [{"codepoint": cp, "char": chr(cp), "name": unicodedata.name(chr(cp), f"U+{cp:04X}"),
                     "split": "train" if _is_train(cp) else "test", "faces": [faces[i].name for i in f]}
                    for cp, f in classes.items()],
        "images": images,
        "sha256": hashlib.sha256("".join(im["sha256"] for im in images).encode()).hexdigest(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=0))
    return manifest


def glyph_dir(data_root=None) -> Path:
    """The folder of the rendered set: ``<data_root or cache>/glyphs-<VERSION>``."""
    return Path(data_root if data_root is not None else default_cache_dir()) / f"glyphs-{VERSION}"


def ensure_glyphs(data_root=None, progress: bool = True) -> Path:
    """Render the glyph set once into ``glyph_dir(data_root)`` (atomic rename) and return that folder."""
    target = glyph_dir(data_root)
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        render_glyphs(tmp, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # another process won the race otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_glyphs(root=None, strict: bool = False) -> DatasetSplits:
    """The glyph set as ``DatasetSplits`` (rendering it first if needed). ``root`` is the data root
    (default the user cache); with ``strict`` every listed image must exist."""
    folder = ensure_glyphs(root)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("version") != VERSION:
        raise DatasetLayoutError(f"glyphs: {folder / 'manifest.json'} has version {manifest.get('version')!r}, expected {VERSION!r}; delete {folder} to re-render")
    split_of = {c["codepoint"]: c["split"] for c in manifest["classes"]}
    out = {}
    for split in ("train", "test"):
        cps = sorted(cp for cp, s in split_of.items() if s == split)
        index = {cp: i for i, cp in enumerate(cps)}
        rows = [im for im in manifest["images"] if split_of[im["codepoint"]] == split]
        paths = [str(folder / im["path"]) for im in rows]
        if strict:
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise DatasetLayoutError(f"glyphs: {len(missing)} rendered images are missing, e.g. {missing[0]}; delete {folder} to re-render")
        labels = np.array([index[im["codepoint"]] for im in rows], dtype=np.int64)
        out[split] = ImageList(paths, labels, [f"U+{cp:04X}" for cp in cps], "glyphs", split)
    return DatasetSplits("glyphs", str(folder), out["train"], test=out["test"])
