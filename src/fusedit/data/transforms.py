"""Image decoding, validation and the resize/crop/normalise transform shared by every real-data source.

A sample that cannot be used raises :class:`SkipSample` with one of ``SKIP_REASONS``; the loaders catch it,
count it and take the next sample, so a bad file never crashes a run and is never dropped silently.

The transform is: resize so the image covers the target (H, W) (for a square target that is "shorter side
= size"), crop to (H, W) (centre, or a random offset that is a pure function of ``(seed, key)``), then map
to a float tensor in [-1, 1]. With aspect-ratio buckets the target is the bucket nearest to the image's
aspect ratio (in log space, so 1:2 and 2:1 are equally far from 1:1).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from fusedit.config import ConfigError

log = logging.getLogger(__name__)

# Why a sample was skipped. "corrupt-shard" is a tar shard that is unreadable from some point on;
# "duplicate" a later copy of a sample key in a tar shard (the first copy is read); "aspect-ratio" an image
# whose long side is more than data.max_aspect_ratio times its short side (a web banner).
SKIP_REASONS = (
    "missing",
    "corrupt",
    "tiny",
    "aspect-ratio",
    "no-caption",
    "bad-row",
    "corrupt-shard",
    "duplicate",
)
# The files a folder scan treats as images (lower-case suffix without the dot) that Pillow reads without a
# plugin; .jfif and .jpe are JPEG's other names, as cameras and Windows save them.
_PLAIN_IMAGE_EXTS = ("jpg", "jpeg", "jfif", "jpe", "png", "webp", "bmp", "gif", "tif", "tiff")
# EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """The files a folder scan (and a shard's check for an image in another format) treats as images: the
    formats Pillow reads without a plugin, then AVIF, HEIC and HEIF where Pillow has an opener registered
    (AVIF is built in from Pillow 11.2 on; HEIC and HEIF need the pillow-heif plugin registered with
    ``pillow_heif.register_heif_opener()``, which fusedit does not do). Listed at first use, not at import:
    asking Pillow imports every format plugin (``Image.init``), a cost every process importing this module
    would pay, and a plugin registered after importing fusedit but before the first scan is seen."""
    registered = Image.registered_extensions()
    return _PLAIN_IMAGE_EXTS + tuple(ext for ext in ("avif", "heic", "heif") if f".{ext}" in registered)


class SkipSample(Exception):
    """A sample that cannot be used: ``reason`` is one of ``SKIP_REASONS``, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def make_rng(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (negative seeds allowed: numpy wants non-negative words)."""
    return np.random.default_rng([int(p) % 2**64 for p in parts])


def stable_key(text: str) -> int:
    """A non-negative 63-bit integer from a string, equal across processes and Python versions.

    (``hash()`` is salted per process, so it cannot key anything that must survive a restart.)
    """
    # "surrogateescape": a tar member or file name that is not UTF-8 reaches here with its bytes escaped as
    # lone surrogates, which strict UTF-8 refuses; every other string encodes as before (its key unchanged).
    data = text.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


@dataclass
class StreamRecord:
    """One raw sample read from a stream (or a catalog), before decoding."""

    fields: dict  # caption sources: {"txt": str, "json": dict, ...} or a table row
    image: Any  # bytes, a path, an HF image dict, or a PIL image
    id: str  # stable sample id (shard/key, relative path, row number)
    key: int  # stable integer for per-sample randomness (stable_key(id) for streams)
    epoch: int = 0
    error: SkipSample | None = None  # the sample was unreadable at the source (e.g. truncated tar member)
    # Problems noticed while reading up to this sample (an unreadable shard): counted when it is consumed.
    events: list = field(default_factory=list)
    # Which of several mixed sources the sample came from ("data.shards entry 1"); "" for a single source.
    source: str = ""


# --------------------------------------------------------------------------------------------------
# Buckets


def parse_buckets(value: Any, multiple: int = 1) -> tuple[tuple[int, int], ...]:
    """``[[H, W], ...]`` -> a tuple of (H, W); each side a positive multiple of ``multiple``."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"data.buckets={value!r} must be a list of [height, width] pairs")
    out = []
    for item in value:
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in item)
        )
        if not ok:
            raise ConfigError(f"data.buckets entry {item!r} must be [height, width] with positive integers")
        if item[0] % multiple or item[1] % multiple:
            raise ConfigError(f"data.buckets entry {list(item)} must have sides divisible by {multiple}")
        out.append((int(item[0]), int(item[1])))
    if len(set(out)) != len(out):
        raise ConfigError(f"data.buckets={value!r} lists a bucket twice")
    return tuple(out)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to width/height (log distance; ties -> first)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


# --------------------------------------------------------------------------------------------------
# Decoding


def open_image(value: Any) -> Image.Image:
    """Open (header only, pixels not decoded yet) an image given as bytes, a path, an HF image dict or a
    PIL image. Raises SkipSample("missing") when there is no image and SkipSample("corrupt") when the
    data is not an image PIL can read."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # Hugging Face Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, (bytes, str)) and len(value) == 0):
        raise SkipSample("missing", "no image data")
    # PIL's decompression-bomb check stays as PIL does it: an image over Image.MAX_IMAGE_PIXELS warns through
    # the process's own warnings filters and is used, one over twice that raises and is skipped below. No
    # catch_warnings() here: before Python 3.14 it swaps the process-wide filter list, so decoder threads
    # entering and leaving it concurrently (with each other or with the main thread) leak or drop filters.
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(value)))
        return Image.open(Path(value))
    except FileNotFoundError:
        raise SkipSample("missing", f"{value} does not exist") from None
    except (IsADirectoryError, NotADirectoryError):
        raise SkipSample("missing", f"{value} is not a file") from None
    except Exception as e:  # any failure to parse the header is the data's (see SampleDecoder.__call__)
        # (A DecompressionBombWarning arrives here when the process's filters turn warnings into errors.)
        bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
        if isinstance(value, (bytes, bytearray, memoryview)) and not isinstance(e, bomb):
            # PIL's message would name a BytesIO object by its memory address: useless and different per run.
            raise SkipSample("corrupt", f"{len(value)} bytes that are not a readable image") from None
        raise SkipSample("corrupt", _short(e)) from None


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation a camera recorded is applied."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not make an otherwise fine image unusable
        orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def decode_rgb(image: Image.Image, where: str = "") -> Image.Image:
    """An opened image's pixels as displayed, in RGB: decoded, the EXIF orientation applied, deep greyscale
    scaled to 8 bits, transparency composited on white (training's decoding, and evaluation's). Raises
    SkipSample("corrupt") for data that fails to decode; closing ``image`` is the caller's. ``where`` names
    the image in a warning (a float image's values clipped: ``_float_to_8bit``); "" = its file's name, if
    it was opened from one."""
    # A PNG's colour key is in the file's own sample scale, while Pillow reads a 16-bit RGB PNG as 8-bit
    # "RGB" (and 2- or 4-bit grey as "L"): only the raw mode, known before the pixels are decoded, tells
    # whether the key can be compared with the decoded pixels.
    raw_mode = image.tile[0][3] if image.format == "PNG" and image.tile else None
    try:
        image.load()  # no catch_warnings() around it: it is not thread-safe (see open_image)
        where = where or getattr(image, "filename", "") or "an image given as bytes"
        return _to_rgb(ImageOps.exif_transpose(image), raw_mode, str(where))
    except Exception as e:
        # Truncated data surfaces only when the pixels are decoded, and PIL's format plugins raise
        # assorted types on malformed data (struct.error, IndexError, ...). This only reads the image,
        # so any exception here is the data's fault: skip it, never crash.
        raise SkipSample("corrupt", _short(e)) from None


class _Once:
    """Whether a warning is the first of its kind in this process (thread-safe: decoder threads)."""

    def __init__(self) -> None:
        self.done = False
        self._lock = threading.Lock()

    def first(self) -> bool:
        with self._lock:
            first, self.done = not self.done, True
        return first


FLOAT_CLIPPED = _Once()


def _float_to_8bit(values: np.ndarray, where: str) -> np.ndarray:
    """A float ("F") greyscale image's values as 8 bits. A float image carries no scale: one whose values
    lie within 0..1 (the usual float convention) is read as 0..1, any other as 0..255 (an 8-bit image
    saved as float, as numpy or OpenCV exports do), never as 16 bits, which would turn 0..255 data nearly
    black. The scale is judged by the 99th percentile, not the maximum, so that a few HDR highlights (or
    1.0000001 from rounding) above 1 do not turn a 0..1 image black. Values outside the scale (negative,
    highlights) are clipped, warned about once per process naming ``where`` and the image's range."""
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    full = 1.0 if values.size == 0 or float(np.percentile(values, 99)) <= 1.0 else 255.0
    if (low < 0.0 or high > full) and FLOAT_CLIPPED.first():
        log.warning(
            "data: the float image %s holds values %g..%g, outside the 0..%g it is read as: clipped (a float "
            "image is read as 0..1 when 99%% of its values stay within 1, else as 0..255; said for the first such "
            "image each data-loading process meets)",
            where,
            low,
            high,
            full,
        )
    return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)


def _deep_grey_to_8bit(image: Image.Image, where: str = "") -> Image.Image:
    """A 16-bit ("I;16*"), 32-bit integer ("I") or float ("F", ``_float_to_8bit``) greyscale image scaled
    to 8 bits ("L").

    PIL's own conversion clips these to 0..255 instead of scaling them, which turns a mid-grey 16-bit PNG
    white. The full scale is 65535 for "I;16*"; "I" carries no bit depth, so it is guessed from the
    brightest pixel: 65535 when it fits (16-bit data read as "I", as Pillow reads some 16-bit PNGs), else
    the int32 maximum.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if image.mode == "F":
        return Image.fromarray(_float_to_8bit(values, where))
    peak = float(values.max(initial=0.0))
    full = 65535.0 if image.mode.startswith("I;16") or peak <= 65535 else float(2**31 - 1)
    # full / 255 is 257 for 16 bits: dividing by it is exact, multiplying by its inverse would round.
    scaled = np.clip(np.rint(values / (full / 255.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def _to_rgb(image: Image.Image, raw_mode: str | None = None, where: str = "") -> Image.Image:
    # A colour key (a PNG's tRNS chunk on an RGB or greyscale image: one colour that is transparent), in the
    # PNG's own sample scale. Pillow decodes 2- and 4-bit grey to "L" scaled up (4-bit 1 is 17), so the key
    # is scaled as the samples were; it reads 16-bit RGB as 8-bit "RGB", whose 16-bit key matches no
    # decoded pixel reliably, so there (and where the raw mode is unknown) the key is not applied.
    key = image.info.get("transparency")
    deep = image.mode.startswith("I;16") or image.mode in ("I", "F")  # greyscale deeper than 8 bits
    if image.mode == "RGB":
        keyed = raw_mode == "RGB" and isinstance(key, tuple)
    elif image.mode == "L":
        bits = {"L": 8, "L;2": 2, "L;4": 4}.get(raw_mode or "")
        keyed = bits is not None and isinstance(key, int)
        key = key * 255 // (2**bits - 1) if keyed else None
    else:  # deep grey keys in its own scale; a palette's transparency is the compositing below
        keyed = deep and isinstance(key, int)
    alpha = None
    if keyed:  # found before 16-bit grey is scaled, where it still tells pixels apart
        match = np.asarray(image) == np.asarray(key)
        alpha = Image.fromarray(
            np.where(match.all(-1) if match.ndim == 3 else match, 0, 255).astype(np.uint8)
        )
    if deep:
        image = _deep_grey_to_8bit(image, where)
    if alpha is not None:
        image = image.convert("RGB")
        image.putalpha(alpha)
    # Transparent pixels carry arbitrary colours; compositing on white is what a viewer shows.
    palette = image.mode == "P" and "transparency" in image.info
    if image.mode in ("RGBA", "LA", "PA") or palette:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_crop(
    image: Image.Image, height: int, width: int, crop: str = "center", seed: int = 0, key: int = 0
) -> Image.Image:
    """Resize ``image`` to cover (height, width) keeping its aspect ratio, then crop to exactly that.

    A random crop offset is drawn from a generator seeded by (seed, key), so it is the same in every
    process and epoch for a given sample.
    """
    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        # Lanczos is the sharper choice when shrinking; bicubic avoids Lanczos' ringing when enlarging.
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize((new_w, new_h), resample)
    if crop == "random":
        rng = make_rng(seed, 1, key)
        left, top = int(rng.integers(0, new_w - width + 1)), int(rng.integers(0, new_h - height + 1))
    else:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    if (left, top, width, height) != (0, 0, new_w, new_h):
        image = image.crop((left, top, left + width, top + height))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 (3, H, W) in [-1, 1] (the convention of the shapes dataset)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# Captions


class NotUTF8:
    """Caption texts whose bytes are not UTF-8, met in this process: how many, and the latest one's name.
    Their bad bytes read as U+FFFD (one such file must not stop a run); the first is warned about, once per
    process, so the replacement is never silent. Each data-loading process counts its own (a DataLoader
    worker forked before any was met starts at 0 and warns at its first), and the warning says so. The
    totals the user reads come from the names ``scope()`` collects per sample: the training loaders carry
    them with the batches (``fusedit.data.loader``), cache-latents compares ``count`` before and after."""

    def __init__(self) -> None:
        self.count, self.last = 0, ""
        self._lock = threading.Lock()  # decoder threads meet captions concurrently
        # The names met within this thread's open ``scope()`` (None outside one): per thread, because stream
        # decoding runs samples on a thread pool and each sample's must be told apart.
        self._local = threading.local()

    @contextlib.contextmanager
    def scope(self) -> Iterator[list[str]]:
        """The names of the captions that are not UTF-8 met by this thread inside the ``with``: how a loader
        carries the count with each sample (a worker process's ``count`` never reaches the main process)."""
        outer = getattr(self._local, "names", None)
        self._local.names = names = []
        try:
            yield names
        finally:
            self._local.names = outer

    def met(self, where: str) -> None:
        names = getattr(self._local, "names", None)
        if names is not None:
            names.append(where)
        with self._lock:
            self.count += 1
            self.last = where
            first = self.count == 1
        if first:
            log.warning(
                "data: the caption in %s is not UTF-8: its bad bytes read as U+FFFD (said for the first such "
                "caption each data-loading process meets; save captions as UTF-8 to keep every character)",
                where,
            )


NOT_UTF8 = NotUTF8()


def decode_text(data: bytes, where: str) -> str:
    """Caption bytes as text: UTF-8 (a byte-order mark from Windows tools dropped); other bytes read as
    U+FFFD and counted in ``NOT_UTF8`` under ``where`` (a file or member name)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        NOT_UTF8.met(where)
        return data.decode("utf-8-sig", errors="replace")


def field_value(record: dict, name: str, parsed: dict | None = None) -> Any:
    """``record[name]``, where a dotted name walks into nested mappings (``json.caption``). A JSON text or
    bytes value on the way is parsed (webdataset ``.json`` members arrive as bytes, decoded by
    ``decode_text``, so bytes that are not UTF-8 are warned about and parsed, not lost); ``parsed`` keeps
    those parses by the path walked (``("json",)``), so several fields of one member parse it once."""
    if name in record:
        return record[name]
    parsed = {} if parsed is None else parsed
    node: Any = record
    parts = name.split(".")
    for k, part in enumerate(parts):
        if isinstance(node, (bytes, str)):
            walked = tuple(parts[:k])
            if walked not in parsed:
                text = (
                    decode_text(node, _member(record, ".".join(walked))) if isinstance(node, bytes) else node
                )
                try:
                    parsed[walked] = json.loads(text)
                except ValueError:
                    parsed[walked] = None
            node = parsed[walked]
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def caption_candidates(record: dict, fields: Sequence[str], parsed: dict | None = None) -> list[str]:
    """The non-empty captions found under ``fields``, in field order, without duplicates. A field holding
    a list of strings (several captions per image) contributes each of them. ``parsed``: as for
    ``field_value``."""
    out: list[str] = []
    parsed = {} if parsed is None else parsed
    for name in fields:
        value = field_value(record, name, parsed)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bytes):  # a tar member's (decoded here, where its name is known, not silently)
                v = decode_text(v, _member(record, name))
            text = _caption_text(v)
            if text and text not in out:
                out.append(text)
    return out


def _member(record: dict, name: str) -> str:
    """Where a caption field's bytes come from: a tar member (``__url__``, the shard, and ``__key__``, the
    sample's key, as the webdataset package and Hugging Face's webdataset loader name them) or a column."""
    key = record.get("__key__")
    if key is None:
        return f"field {name!r}"
    url = record.get("__url__")
    return f"{url}/{key}.{name}" if url else f"{key}.{name}"


def _caption_text(value: Any) -> str | None:
    """A caption field's value as stripped text (bytes decoded), None when it is not text. Bytes reach here
    only from the emptiness probe of ``SampleDecoder.captions``, after ``caption_candidates`` has decoded
    the same bytes through ``decode_text`` (and warned about any that are not UTF-8): not warned again."""
    if isinstance(value, bytes):
        value = value.decode("utf-8-sig", errors="replace")  # -sig: a BOM (Windows tools) is not caption text
    return value.strip() if isinstance(value, str) else None


def pick_caption(candidates: Sequence[str], mode: str, seed: int, epoch: int, key: int) -> str:
    """ "first": the first candidate; "random": one drawn from (seed, epoch, key), so a sample with several
    captions shows a different one from epoch to epoch, identically in every run with that seed."""
    if mode == "first" or len(candidates) == 1:
        return candidates[0]
    return candidates[int(make_rng(seed, 2, epoch, key).integers(len(candidates)))]


# --------------------------------------------------------------------------------------------------
# One sample, end to end


@dataclass(frozen=True)
class Decoded:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    captions: tuple[str, ...]  # every candidate (what a latent cache stores)
    bucket: int  # index into SampleDecoder.targets


@dataclass(frozen=True)
class SampleDecoder:
    """Record -> :class:`Decoded`, or SkipSample. Pure and picklable: safe in worker processes/threads."""

    targets: tuple[tuple[int, int], ...]  # (H, W) per bucket; one square target without buckets
    crop: str = "center"
    seed: int = 0
    min_image_size: int = 1
    max_aspect_ratio: float = 0.0  # long side / short side above which an image is skipped; 0 = no limit
    caption_fields: tuple[str, ...] = ("txt", "caption")
    caption_pick: str = "random"

    @classmethod
    def from_config(cls, cfg: Any, seed: int) -> SampleDecoder:
        buckets = parse_buckets(cfg.buckets) if cfg.buckets else ((cfg.image_size, cfg.image_size),)
        # A list from YAML; a tuple from code is the same fields (a bare string is not: it is no list).
        if not isinstance(cfg.caption_fields, (list, tuple)) or not all(
            isinstance(f, str) and f for f in cfg.caption_fields
        ):
            raise ConfigError(f"data.caption_fields={cfg.caption_fields!r} must be a non-empty list of names")
        if not cfg.caption_fields:
            raise ConfigError("data.caption_fields=[] must name at least one caption field")
        min_size = cfg.min_image_size if cfg.min_image_size is not None else max(1, cfg.image_size // 2)
        return cls(
            targets=buckets,
            crop=cfg.crop,
            seed=seed,
            min_image_size=min_size,
            max_aspect_ratio=cfg.max_aspect_ratio or 0.0,  # None and 0 both mean no limit
            caption_fields=tuple(cfg.caption_fields),
            caption_pick=cfg.caption_pick,
        )

    def bucket_for(self, width: int, height: int) -> int:
        return nearest_bucket(width, height, self.targets) if len(self.targets) > 1 else 0

    def check_size(self, width: int, height: int) -> None:
        """Skip an image too small (``tiny``) or too elongated (``aspect-ratio``) to train on, from its
        displayed size: the header's, so planning, streams and a latent cache skip the same images."""
        if min(width, height) < self.min_image_size:
            raise SkipSample("tiny", f"{width}x{height} < min_image_size {self.min_image_size}")
        if not self.max_aspect_ratio:  # off (0)
            return
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise SkipSample(
                "aspect-ratio",
                f"{width}x{height} is {ratio:.3g}:1 > max_aspect_ratio {self.max_aspect_ratio:g}",
            )

    def captions(self, record: dict) -> tuple[str, ...]:
        parsed: dict = {}  # a .json member parsed (and its bytes decoded) once, by both lookups
        found = caption_candidates(record, self.caption_fields, parsed)
        if not found:
            # A field that is there but blank (an empty .txt member: a captioning pass that failed on the
            # image) is a fix to the data, not to data.caption_fields: say which.
            empty = [
                name for name in self.caption_fields if _caption_text(field_value(record, name, parsed)) == ""
            ]
            raise SkipSample(
                "no-caption",
                f"its {' and '.join(empty)} field{'s are' if len(empty) > 1 else ' is'} empty"
                if empty
                else f"none of the fields {list(self.caption_fields)} holds text",
            )
        return tuple(found)

    def __call__(
        self,
        record: dict,
        image_value: Any,
        *,
        key: int,
        epoch: int = 0,
        bucket: int | None = None,
    ) -> Decoded:
        """Decode one sample. ``bucket`` forces a target (a planned batch); None picks it from the image's
        own aspect ratio (a stream)."""
        captions = self.captions(record)  # before decoding: a caption-less sample costs no image decode
        image = open_image(image_value)
        try:
            width, height = oriented_size(image)
            self.check_size(width, height)
            bucket = self.bucket_for(width, height) if bucket is None else bucket
            target_h, target_w = self.targets[bucket]
            # JPEG draft mode decodes at a reduced DCT scale (still >= the requested size): a large photo
            # decodes several times faster and is then resized less.
            scale = max(target_h / height, target_w / width)
            draft = (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale))
            if image.format == "JPEG" and scale < 0.5:
                image.draft("RGB", draft)
            image = decode_rgb(image, _image_name(record, image_value))
        except SkipSample:
            image.close()
            raise
        except Exception as e:  # a malformed header or EXIF block (see decode_rgb): the data's fault
            image.close()
            raise SkipSample("corrupt", _short(e)) from None
        tensor = to_tensor(resize_crop(image, target_h, target_w, self.crop, self.seed, key))
        caption = pick_caption(captions, self.caption_pick, self.seed, epoch, key)
        return Decoded(image=tensor, caption=caption, captions=captions, bucket=bucket)

    def header(self, image_value: Any) -> tuple[int, int]:
        """(width, height) from the header only, validated by ``check_size`` (for bucket planning)."""
        image = open_image(image_value)
        try:
            width, height = oriented_size(image)
        finally:
            image.close()  # only the header was read; release the file now rather than at GC
        self.check_size(width, height)
        return width, height


def _image_name(record: dict, image_value: Any) -> str:
    """The image of a sample, as a warning names it: its file, or its tar member's shard and key; "" where
    neither is known (an hf row's bytes: ``decode_rgb`` then says so)."""
    if isinstance(image_value, dict):
        image_value = image_value.get("path")
    if isinstance(image_value, (str, Path)):
        return str(image_value)
    key = record.get("__key__")
    if key is None:
        return ""
    url = record.get("__url__")
    return f"{url}/{key}" if url else str(key)
