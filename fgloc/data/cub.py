"""CUB-200-2011 with its 15 part keypoints: an in-memory reader and a TFDS builder.

Dataset: Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset" (CNS-TR-2011-001), 11,788
photos of 200 bird species, one box and 15 part keypoints per image. TFDS ships CUB as
``caltech_birds2011`` but without the part keypoints, which papers 1 and 2 of this project
need; this module adds them.

Two ways in:

* :func:`read_cub` -- a fast, validating reader that returns :class:`CubAnnotations` (numpy
  arrays for every image). Experiments use it directly.
* :class:`Cub2002011Parts` -- the TFDS builder ``cub200_2011_parts`` built on :func:`read_cub`.
  It writes ``array_record`` files, read back with ``tfds.data_source`` (see
  :func:`cub_data_source`) and :mod:`fgloc.data.pipeline`. No TensorFlow needed.

Both accept the official ``CUB_200_2011.tgz`` (read with :mod:`tarfile`, nothing extracted to
disk) or an extracted ``CUB_200_2011/`` folder; see :func:`find_cub`.

Coordinates (checked on the real files in ``../shared/data/CUB_200_2011``):

* ``bounding_boxes.txt`` rows are ``id x y w h`` in pixels with a 0-based origin (12 of the
  1,402 subset boxes have ``x = 0``, so 1-based is ruled out). They become ``[x0, y0, x1, y1] =
  [x, y, x + w, y + h]`` -- ``x1``/``y1`` exclusive, as in DEVELOPING.md -- clipped to
  ``[0, W] x [0, H]`` (8 subset boxes run past the border).
* ``parts/part_locs.txt`` rows are ``id part x y visible``; ``x, y`` are integer pixel indices of
  the part's pixel, kept unchanged (no 0/1-based shift: the files cannot tell, since every
  visible part lies at least 6 pixels from every border, and keeping them matches the boxes and
  every published CUB part-localization evaluation). In continuous coordinates the part is at
  ``(x + 0.5, y + 0.5)``; :mod:`fgloc.data.pipeline` transforms it that way. Invisible parts
  are stored as ``(0, 0)`` with ``visible = False``.

Run ``python -m fgloc.data.cub --data_dir DIR --summary [--prepare]`` for split sizes and
per-part visibility counts (``DIR`` holds ``CUB_200_2011/`` or ``CUB_200_2011.tgz``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pathlib
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from fgloc.data.cub_parts import CUB_PART_NAMES

NUM_CLASSES = 200
NUM_PARTS = 15
#: The 15 CUB part names in ``parts/parts.txt`` order (part id = index + 1); defined once, in
#: `fgloc.metrics` (which the part metrics need without the TFDS import).
PART_NAMES = CUB_PART_NAMES
ARCHIVE_NAME = "CUB_200_2011.tgz"
FOLDER_NAME = "CUB_200_2011"
_TEXT_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "bounding_boxes.txt",
    "train_test_split.txt",
    "classes.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
)


class CubFormatError(ValueError):
    """A CUB annotation file or image is missing or malformed; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class CubAnnotations:
    """All CUB annotations as numpy arrays, one row per image in ``images.txt`` order.

    Attributes:
      source: the ``CUB_200_2011`` folder or the ``CUB_200_2011.tgz`` archive read.
      image_ids: ``(N,)`` int64, CUB's own 1-based image ids (kept, not renumbered).
      file_names: ``(N,)`` str, paths relative to ``images/`` as in ``images.txt``.
      labels: ``(N,)`` int64 class index in ``[0, 200)`` (CUB class id - 1).
      boxes: ``(N, 4)`` float32 ``[x0, y0, x1, y1]`` pixels, x1/y1 exclusive, clipped to the image.
      parts: ``(N, P, 2)`` float32 ``(x, y)`` pixel indices; ``(0, 0)`` where invisible.
      visible: ``(N, P)`` bool.
      is_train: ``(N,)`` bool, from ``train_test_split.txt``.
      image_sizes: ``(N, 2)`` int64 ``(height, width)`` read from the JPEG headers.
      class_names: the 200 names of ``classes.txt`` (e.g. ``"001.Black_footed_Albatross"``).
      part_names: the P names of ``parts/parts.txt``.
    """

    source: pathlib.Path
    image_ids: np.ndarray
    file_names: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    parts: np.ndarray
    visible: np.ndarray
    is_train: np.ndarray
    image_sizes: np.ndarray
    class_names: tuple[str, ...]
    part_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def is_archive(self) -> bool:
        return self.source.is_file()

    @property
    def paths(self) -> np.ndarray:
        """``(N,)`` absolute image paths (folder layout only)."""
        if self.is_archive:
            raise ValueError(
                f"{self.source}: images inside an archive have no paths; use iter_image_bytes()"
            )
        root = self.source / "images"
        return np.array([str(root / name) for name in self.file_names])

    def subset(self, index: np.ndarray | Sequence[int]) -> CubAnnotations:
        """The rows ``index`` (integer indices or a boolean mask) of every per-image array."""
        index = np.asarray(index)
        fields = {
            f.name: getattr(self, f.name)[index]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }
        return dataclasses.replace(self, **fields)

    def split(self, name: str) -> CubAnnotations:
        """The ``"train"`` or ``"test"`` images (``"all"`` returns everything)."""
        if name == "all":
            return self
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {name!r}")
        return self.subset(self.is_train if name == "train" else ~self.is_train)

    def classes(self, class_ids: Sequence[int]) -> CubAnnotations:
        """The images of the CUB class ids ``class_ids`` (1-based, as ``classes.txt``)."""
        ids = np.asarray(list(class_ids), np.int64)
        if ids.size and (ids.min() < 1 or ids.max() > len(self.class_names)):
            raise ValueError(
                f"class ids must lie in 1..{len(self.class_names)}, got {ids.min()}..{ids.max()}"
            )
        return self.subset(np.isin(self.labels, ids - 1))


# The class-disjoint protocol (issue 18): every design choice (threshold, weights, resolution,
# which map) is fixed on DESIGN_CLASSES; the same configuration is then trained on the train split
# of SCORE_CLASSES and scored on their test split. CUB class ids, 1-based.
DESIGN_CLASSES = tuple(range(1, 13))
SCORE_CLASSES = tuple(range(13, 26))


# ----------------------------------------------------------------------------- locating files


def find_cub(path: str | os.PathLike[str]) -> pathlib.Path:
    """Resolves ``path`` to the CUB folder (the one holding ``images.txt``) or the ``.tgz``.

    ``path`` may be that folder, the archive itself, or a directory holding ``CUB_200_2011/``
    or ``CUB_200_2011.tgz`` (the TFDS manual-download directory); the folder wins if both exist.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise CubFormatError(f"{path}: not a tar archive")
        return path.resolve()
    if (path / "images.txt").is_file():
        return path.resolve()
    if (path / FOLDER_NAME / "images.txt").is_file():
        return (path / FOLDER_NAME).resolve()
    if (path / ARCHIVE_NAME).is_file():
        return (path / ARCHIVE_NAME).resolve()
    raise CubFormatError(
        f"{path}: no CUB-200-2011 data found (expected images.txt, {FOLDER_NAME}/images.txt "
        f"or {ARCHIVE_NAME})"
    )


def _archive_prefix(names: Iterable[str], archive: pathlib.Path) -> str:
    """The member-name prefix of the folder holding ``images.txt`` (``""`` or ``"X/"``)."""
    candidates = sorted(
        (n[: -len("images.txt")] for n in names if n == "images.txt" or n.endswith("/images.txt")),
        key=len,
    )
    if not candidates:
        raise CubFormatError(f"{archive}: archive holds no images.txt")
    return candidates[0]


def _image_size(data: bytes | pathlib.Path, name: str) -> tuple[int, int]:
    """``(height, width)`` from an image header (PIL reads only the header)."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        with Image.open(src) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise CubFormatError(f"{name}: cannot read image header ({e})") from e
    return height, width


# ----------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class _Row:
    where: str  # "file:line"
    fields: list[str]


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text of an annotation file; a bad byte is an error naming the file and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CubFormatError(
            f"{name}:{line}: not UTF-8 text (byte {data[e.start]:#04x}: {e.reason})"
        ) from None


def _rows(name: str, text: str, n_fields: int, *, text_last: bool = False) -> list[_Row]:
    """Splits ``text`` into rows of exactly ``n_fields`` whitespace-separated fields.

    With ``text_last`` the last field takes the rest of the line (part names contain spaces).
    Blank lines are skipped; line numbers in errors count them.
    """
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=n_fields - 1) if text_last else line.split()
        if len(fields) != n_fields:
            raise CubFormatError(
                f"{name}:{lineno}: expected {n_fields} fields, got {len(line.split())}: "
                f"{line.strip()!r}"
            )
        rows.append(_Row(f"{name}:{lineno}", fields))
    return rows


def _int(row: _Row, i: int) -> int:
    try:
        return int(row.fields[i])
    except ValueError:
        raise CubFormatError(
            f"{row.where}: field {i + 1} is not an integer: {row.fields[i]!r}"
        ) from None


def _float(row: _Row, i: int) -> float:
    try:
        value = float(row.fields[i])
    except ValueError:
        raise CubFormatError(
            f"{row.where}: field {i + 1} is not a number: {row.fields[i]!r}"
        ) from None
    if not np.isfinite(value):
        raise CubFormatError(f"{row.where}: field {i + 1} is not finite: {row.fields[i]!r}")
    return value


def _numbered_names(name: str, text: str) -> tuple[str, ...]:
    """Parses ``id name`` rows whose ids must run 1, 2, ..., K in order."""
    names = []
    for row in _rows(name, text, 2, text_last=True):
        if _int(row, 0) != len(names) + 1:
            raise CubFormatError(f"{row.where}: expected id {len(names) + 1}, got {row.fields[0]}")
        names.append(row.fields[1].strip())
    if not names:
        raise CubFormatError(f"{name}: file is empty")
    return tuple(names)


def _per_image(name: str, text: str, n_fields: int, index: dict[int, int]) -> list[_Row]:
    """Rows of a one-row-per-image file, ordered like ``images.txt``; checks ids."""
    out: list[_Row | None] = [None] * len(index)
    for row in _rows(name, text, n_fields):
        image_id = _int(row, 0)
        if image_id not in index:
            raise CubFormatError(f"{row.where}: unknown image id {image_id} (not in images.txt)")
        if out[index[image_id]] is not None:
            raise CubFormatError(f"{row.where}: duplicate row for image id {image_id}")
        out[index[image_id]] = row
    missing = [i for i, r in zip(index, out) if r is None]
    if missing:
        raise CubFormatError(f"{name}: no row for {len(missing)} image id(s), first {missing[0]}")
    return out  # type: ignore[return-value]


def _parse(
    texts: dict[str, tuple[str, str]],
    size_of: Callable[[_Row], tuple[int, int]],
    source: pathlib.Path,
) -> CubAnnotations:
    """Builds :class:`CubAnnotations` from the seven text files (``rel -> (display, text)``)."""
    class_names = _numbered_names(*texts["classes.txt"])
    part_names = _numbered_names(*texts["parts/parts.txt"])
    n_classes, n_parts = len(class_names), len(part_names)

    images_name, images_text = texts["images.txt"]
    index: dict[int, int] = {}
    image_ids, file_names, image_sizes = [], [], []
    for row in _rows(images_name, images_text, 2):
        image_id = _int(row, 0)
        if image_id in index:
            raise CubFormatError(f"{row.where}: duplicate image id {image_id}")
        index[image_id] = len(image_ids)
        image_ids.append(image_id)
        file_names.append(row.fields[1])
        image_sizes.append(size_of(row))
    if not image_ids:
        raise CubFormatError(f"{images_name}: no images listed")
    n = len(image_ids)

    labels = np.empty(n, np.int64)
    for i, row in enumerate(_per_image(*texts["image_class_labels.txt"], 2, index)):
        class_id = _int(row, 1)
        if not 1 <= class_id <= n_classes:
            raise CubFormatError(f"{row.where}: class id {class_id} out of range 1..{n_classes}")
        labels[i] = class_id - 1

    is_train = np.empty(n, bool)
    for i, row in enumerate(_per_image(*texts["train_test_split.txt"], 2, index)):
        flag = _int(row, 1)
        if flag not in (0, 1):
            raise CubFormatError(f"{row.where}: is_training_image must be 0 or 1, got {flag}")
        is_train[i] = flag == 1

    sizes_arr = np.asarray(image_sizes, np.int64).reshape(n, 2)
    xywh = np.empty((n, 4), np.float64)
    for i, row in enumerate(_per_image(*texts["bounding_boxes.txt"], 5, index)):
        xywh[i] = [_float(row, k) for k in range(1, 5)]
        if xywh[i, 2] < 0 or xywh[i, 3] < 0:
            raise CubFormatError(f"{row.where}: negative box width or height")
    height, width = sizes_arr[:, 0:1].astype(np.float64), sizes_arr[:, 1:2].astype(np.float64)
    lo = xywh[:, :2]
    hi = xywh[:, :2] + xywh[:, 2:]
    limit = np.concatenate([width, height], axis=1)
    boxes = np.concatenate([np.clip(lo, 0, limit), np.clip(hi, 0, limit)], axis=1)

    parts = np.zeros((n, n_parts, 2), np.float32)
    visible = np.zeros((n, n_parts), bool)
    seen = np.zeros((n, n_parts), bool)
    locs_name, locs_text = texts["parts/part_locs.txt"]
    for row in _rows(locs_name, locs_text, 5):
        image_id, part_id = _int(row, 0), _int(row, 1)
        if image_id not in index:
            raise CubFormatError(f"{row.where}: unknown image id {image_id} (not in images.txt)")
        if not 1 <= part_id <= n_parts:
            raise CubFormatError(f"{row.where}: part id {part_id} out of range 1..{n_parts}")
        flag = _int(row, 4)
        if flag not in (0, 1):
            raise CubFormatError(f"{row.where}: visible must be 0 or 1, got {flag}")
        i, p = index[image_id], part_id - 1
        if seen[i, p]:
            raise CubFormatError(f"{row.where}: duplicate row for image {image_id} part {part_id}")
        seen[i, p] = True
        parts[i, p] = (_float(row, 2), _float(row, 3))
        visible[i, p] = flag == 1
    if not seen.all():
        i, p = np.argwhere(~seen)[0]
        raise CubFormatError(
            f"{locs_name}: {int((~seen).sum())} (image, part) pair(s) missing, first image id "
            f"{image_ids[i]} part {p + 1}"
        )
    return CubAnnotations(
        source=source,
        image_ids=np.asarray(image_ids, np.int64),
        file_names=np.asarray(file_names),
        labels=labels,
        boxes=boxes.astype(np.float32),
        parts=parts,
        visible=visible,
        is_train=is_train,
        image_sizes=sizes_arr,
        class_names=class_names,
        part_names=part_names,
    )


def read_cub(path: str | os.PathLike[str]) -> CubAnnotations:
    """Reads and validates CUB-200-2011 annotations (see :func:`find_cub` for ``path``).

    Reads the seven annotation files and every image header (for clipping boxes). From an
    archive this is one sequential pass over the ``.tgz``. Any missing image, row with the
    wrong field count, non-numeric value, id out of range, unknown or duplicate image id, or
    missing row raises :class:`CubFormatError` naming the file and line.

    Returns:
      :class:`CubAnnotations` with one row per ``images.txt`` line.
    """
    source = find_cub(path)
    if source.is_dir():
        texts = {}
        for rel in _TEXT_FILES:
            file = source / rel
            if not file.is_file():
                raise CubFormatError(f"{file}: file not found")
            texts[rel] = (str(file), _decode(file.read_bytes(), str(file)))

        def size_of(row: _Row) -> tuple[int, int]:
            image = source / "images" / row.fields[1]
            if not image.is_file():
                raise CubFormatError(f"{row.where}: image file not found: {image}")
            return _image_size(image, str(image))

        return _parse(texts, size_of, source)

    raw_texts: dict[str, bytes] = {}
    sizes: dict[str, tuple[int, int]] = {}
    with tarfile.open(source, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            low = member.name.lower()
            is_text = any(member.name.endswith(rel) for rel in _TEXT_FILES)
            is_image = "/images/" in f"/{member.name}" and low.endswith((".jpg", ".jpeg", ".png"))
            if not (is_text or is_image):
                continue
            f = tar.extractfile(member)
            assert f is not None
            data = f.read()
            if is_text:
                raw_texts[member.name] = data
            else:
                sizes[member.name] = _image_size(data, f"{source}:{member.name}")
    prefix = _archive_prefix(raw_texts, source)
    texts = {}
    for rel in _TEXT_FILES:
        if prefix + rel not in raw_texts:
            raise CubFormatError(f"{source}: archive has no {prefix + rel}")
        where = f"{source}:{prefix + rel}"
        texts[rel] = (where, _decode(raw_texts[prefix + rel], where))

    def size_of_member(row: _Row) -> tuple[int, int]:
        name = f"{prefix}images/{row.fields[1]}"
        if name not in sizes:
            raise CubFormatError(f"{row.where}: image not in archive {source}: {name}")
        return sizes[name]

    return _parse(texts, size_of_member, source)


def _image_key(member: str, wanted: dict[str, int]) -> str | None:
    """The ``images/<file name>`` tail of an archive member name, if it is a wanted one."""
    start = member.find("images/")
    while start >= 0:
        if (start == 0 or member[start - 1] == "/") and member[start:] in wanted:
            return member[start:]
        start = member.find("images/", start + 1)
    return None


def iter_image_bytes(ann: CubAnnotations) -> Iterator[tuple[int, bytes]]:
    """Yields ``(row index, encoded image bytes)`` for every image of ``ann``.

    Folder layout: rows in order. Archive: archive order, one sequential pass over the ``.tgz``.
    """
    if not ann.is_archive:
        for i, path in enumerate(ann.paths):
            yield i, pathlib.Path(path).read_bytes()
        return
    wanted = {f"images/{name}": i for i, name in enumerate(ann.file_names)}
    found = 0
    with tarfile.open(ann.source, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key = _image_key(member.name, wanted)
            if key is not None:
                f = tar.extractfile(member)
                assert f is not None
                yield wanted[key], f.read()
                found += 1
    if found != len(wanted):
        raise CubFormatError(f"{ann.source}: {len(wanted) - found} listed image(s) not found")


# ----------------------------------------------------------------------------- TFDS builder


class Cub2002011Parts(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``cub200_2011_parts``: CUB-200-2011 with boxes and the 15 part keypoints.

    Manual download: put ``CUB_200_2011.tgz`` or the extracted ``CUB_200_2011/`` in the manual
    directory (``download_config=tfds.download.DownloadConfig(manual_dir=DIR)``). Splits
    ``train`` / ``test`` follow ``train_test_split.txt``. Features per example:

    * ``image``: the original JPEG bytes (``(H, W, 3)`` uint8 once decoded; some are
      grayscale JPEGs, 2 in classes 1-25 -- decode with
      :func:`fgloc.data.images.decode_image`).
    * ``label``: class index ``[0, 200)``, names from ``classes.txt``.
    * ``image_id`` (CUB's id), ``file_name`` (relative to ``images/``).
    * ``bbox``: ``(4,)`` float32 ``[x0, y0, x1, y1]`` pixels, clipped (see module docstring).
    * ``parts``: ``(15, 2)`` float32 ``(x, y)`` pixels; ``parts_visible``: ``(15,)`` bool.
    * ``image_size``: ``(2,)`` int64 ``(height, width)``.

    Part names are in ``info.metadata["part_names"]`` (and :data:`PART_NAMES`).
    """

    name = "cub200_2011_parts"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: CUB-200-2011 with 15 part keypoints."}  # noqa: RUF012
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {ARCHIVE_NAME} (from https://www.vision.caltech.edu/datasets/cub_200_2011/) "
        f"or the extracted {FOLDER_NAME}/ folder in the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CUB-200-2011 birds with bounding boxes and 15 part keypoints.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "file_name": tfds.features.Text(),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "parts": tfds.features.Tensor(shape=(NUM_PARTS, 2), dtype=np.float32),
                    "parts_visible": tfds.features.Tensor(shape=(NUM_PARTS,), dtype=np.bool_),
                    "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
            citation=(
                "@techreport{WahCUB_200_2011, title={The Caltech-UCSD Birds-200-2011 Dataset},"
                " author={Wah, C. and Branson, S. and Welinder, P. and Perona, P. and "
                "Belongie, S.}, year={2011}, institution={California Institute of Technology},"
                " number={CNS-TR-2011-001}}"
            ),
            metadata=tfds.core.MetadataDict(part_names=list(PART_NAMES)),
        )

    def _split_generators(self, dl_manager):  # type: ignore[override]
        ann = read_cub(dl_manager.manual_dir)
        if len(ann.class_names) != NUM_CLASSES:
            raise CubFormatError(
                f"{ann.source}: classes.txt lists {len(ann.class_names)} classes, expected "
                f"{NUM_CLASSES}"
            )
        if ann.part_names != PART_NAMES:
            raise CubFormatError(
                f"{ann.source}: parts/parts.txt names {ann.part_names} differ from {PART_NAMES}"
            )
        label = cast(tfds.features.ClassLabel, self.info.features["label"])  # type: ignore[index]
        label.names = list(ann.class_names)
        return {
            "train": self._generate_examples(ann.split("train")),
            "test": self._generate_examples(ann.split("test")),
        }

    def _generate_examples(self, ann: CubAnnotations):  # type: ignore[override]
        for i, data in iter_image_bytes(ann):
            yield (
                int(ann.image_ids[i]),
                {
                    "image": data,
                    "label": int(ann.labels[i]),
                    "image_id": int(ann.image_ids[i]),
                    "file_name": str(ann.file_names[i]),
                    "bbox": ann.boxes[i],
                    "parts": ann.parts[i],
                    "parts_visible": ann.visible[i],
                    "image_size": ann.image_sizes[i],
                },
            )


def default_tfds_dir() -> pathlib.Path:
    """``$FGLOC_CACHE/tfds`` (default ``~/.cache/fgloc/tfds``)."""
    cache = os.environ.get("FGLOC_CACHE") or os.path.join("~", ".cache", "fgloc")
    return pathlib.Path(cache).expanduser() / "tfds"


def prepare_cub(
    data_dir: str | os.PathLike[str], tfds_dir: str | os.PathLike[str] | None = None
) -> Cub2002011Parts:
    """Builds the ``cub200_2011_parts`` array_record files from ``data_dir`` (manual dir).

    ``data_dir`` is anything :func:`find_cub` accepts. Returns the prepared builder; a second
    call reuses the files.
    """
    source = find_cub(data_dir)
    manual = source.parent if source.is_file() else pathlib.Path(data_dir)
    builder = Cub2002011Parts(
        data_dir=os.fspath(tfds_dir or default_tfds_dir()), file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
    )
    return builder


def cub_data_source(
    split: str,
    tfds_dir: str | os.PathLike[str] | None = None,
    *,
    raw_images: bool = True,
) -> Sequence[dict[str, Any]]:
    """Random-access ``tfds.data_source`` over a prepared ``cub200_2011_parts`` split.

    With ``raw_images`` the ``image`` field stays JPEG bytes (decoded later by
    :mod:`fgloc.data.pipeline` through :func:`fgloc.data.images.decode_image`); otherwise TFDS
    decodes it to ``(H, W, 3)`` uint8.
    """
    decoders = {"image": tfds.decode.SkipDecoding()} if raw_images else None
    source = tfds.data_source(
        Cub2002011Parts.name,
        split=split,
        data_dir=os.fspath(tfds_dir or default_tfds_dir()),
        download=False,
        decoders=decoders,
    )
    return cast(Sequence[dict[str, Any]], source)


# ----------------------------------------------------------------------------- CLI


def summary(ann: CubAnnotations) -> str:
    """Split sizes and per-part visibility counts (all images, then train / test)."""
    n_train = int(ann.is_train.sum())
    lines = [
        f"source: {ann.source}",
        f"train: {n_train}",
        f"test: {len(ann) - n_train}",
        f"total: {len(ann)}",
        f"classes present: {len(np.unique(ann.labels))} of {len(ann.class_names)}",
        "visible parts (all / train / test):",
    ]
    total = ann.visible.sum(0)
    train = ann.visible[ann.is_train].sum(0)
    for p, name in enumerate(ann.part_names):
        lines.append(
            f"  {p + 1:2d} {name:<11s} {total[p]:6d} {train[p]:6d} {total[p] - train[p]:6d}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fgloc.data.cub",
        description="CUB-200-2011 with part keypoints: summary and TFDS preparation.",
    )
    parser.add_argument(
        "--data_dir", required=True, help=f"directory holding {FOLDER_NAME}/ or {ARCHIVE_NAME}"
    )
    parser.add_argument("--summary", action="store_true", help="print split and part counts")
    parser.add_argument(
        "--prepare", action="store_true", help="build the TFDS array_record dataset into --tfds_dir"
    )
    parser.add_argument(
        "--tfds_dir", default=None, help=f"TFDS data dir (default {default_tfds_dir()})"
    )
    args = parser.parse_args(argv)
    if not (args.summary or args.prepare):
        parser.error("nothing to do: give --summary and/or --prepare")
    try:
        if args.summary:
            print(summary(read_cub(args.data_dir)))
        if args.prepare:
            builder = prepare_cub(args.data_dir, args.tfds_dir)
            splits = builder.info.splits
            print(
                f"prepared {builder.data_dir}: "
                + ", ".join(f"{k}: {v.num_examples}" for k, v in splits.items())
            )
    except CubFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
