"""ILSVRC-2012 validation images with class labels and object boxes (CAM's localization data).

Two layouts are read into the same :class:`ImagenetAnnotations`:

* **wsolevaluation layout** (clovaai/wsolevaluation ``metadata/ILSVRC``, as in
  ``../shared/data/imagenet_val_sample``): ``class_labels.txt`` (``val/NAME,label``),
  ``localization.txt`` (``val/NAME,x0,y0,x1,y1``, one line per box) and ``synset_words.txt``
  (``nXXXXXXXX names``, 1,000 lines in sorted-synset order: line ``i`` is label ``i``).
* **ILSVRC XML layout**: one PASCAL-VOC-style XML file per image (``<size>``, and per
  ``<object>`` a synset ``<name>`` and ``<bndbox>`` ``xmin ymin xmax ymax``), as in the official
  ``ILSVRC2012_bbox_val_v3.tgz`` or Kaggle's ``ILSVRC/Annotations/CLS-LOC/val``. The label is
  the objects' synset (one class per validation image); an optional label file
  (``NAME label`` per line, Caffe's ``val.txt``, or ``val/NAME,label``) is cross-checked.

Boxes are ``(k, 4)`` float32 ``[x0, y0, x1, y1]`` pixels, the XML values unchanged -- the same
convention as wsolevaluation's ``localization.txt``, whose first row
(``ILSVRC2012_val_00000001: 111,108,441,193``) is that image's XML box. Labels are indices into
the sorted synset list (the standard Caffe/torchvision order).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np

NUM_CLASSES = 1000


class ImagenetFormatError(ValueError):
    """An ImageNet annotation file is missing or malformed; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class ImagenetAnnotations:
    """ILSVRC validation annotations, one row per image.

    Attributes:
      root: the directory read.
      names: ``(N,)`` str, image names relative to ``root``
        (``"val/ILSVRC2012_val_00000001.JPEG"``).
      paths: ``(N,)`` str, absolute image paths.
      labels: ``(N,)`` int64 in ``[0, 1000)``, sorted-synset order.
      boxes: N arrays ``(k_i, 4)`` float32 ``[x0, y0, x1, y1]`` pixels, ``k_i >= 1``.
      synsets: the 1,000 WordNet ids (``"n01440764"``), sorted; ``synsets[label]``.
      class_names: the 1,000 names from ``synset_words.txt`` (``"tench, Tinca tinca"``).
      image_sizes: ``(N, 2)`` int64 ``(height, width)`` from the XML ``<size>``, or ``None``
        (wsolevaluation layout).
    """

    root: pathlib.Path
    names: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    boxes: tuple[np.ndarray, ...]
    synsets: tuple[str, ...]
    class_names: tuple[str, ...]
    image_sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def as_source(self, max_boxes: int | None = None) -> ImagenetSource:
        """A random-access example source for :func:`fgloc.data.pipeline.make_pipeline`."""
        return ImagenetSource(self, max_boxes)


class ImagenetSource(Sequence[dict[str, Any]]):
    """Examples of :class:`ImagenetAnnotations` as dicts of fixed-shape arrays.

    Each example: ``image`` (encoded bytes, decoded by the pipeline), ``file_name``, ``label``,
    ``boxes`` ``(max_boxes, 4)`` float32 zero-padded, ``boxes_valid`` ``(max_boxes,)`` bool.
    ``max_boxes`` defaults to the largest box count in the set.
    """

    def __init__(self, ann: ImagenetAnnotations, max_boxes: int | None = None):
        most = max((len(b) for b in ann.boxes), default=0)
        if max_boxes is None:
            max_boxes = most
        if max_boxes < most:
            raise ValueError(f"max_boxes={max_boxes} but an image of {ann.root} has {most} boxes")
        self.ann = ann
        self.max_boxes = max_boxes

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        ann = self.ann
        if not -len(ann) <= index < len(ann):
            raise IndexError(index)
        boxes = np.zeros((self.max_boxes, 4), np.float32)
        valid = np.zeros(self.max_boxes, bool)
        k = len(ann.boxes[index])
        boxes[:k] = ann.boxes[index]
        valid[:k] = True
        return {
            "image": pathlib.Path(ann.paths[index]).read_bytes(),
            "file_name": str(ann.names[index]),
            "label": np.int64(ann.labels[index]),
            "boxes": boxes,
            "boxes_valid": valid,
        }


# ----------------------------------------------------------------------------- files


def _read_lines(path: pathlib.Path) -> list[str]:
    """The lines of a UTF-8 text file; a missing file or a bad byte names the file (and line)."""
    if not path.is_file():
        raise ImagenetFormatError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ImagenetFormatError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}: {e.reason})"
        ) from None
    return text.splitlines()


def read_synset_words(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Reads ``synset_words.txt`` (``nXXXXXXXX name, name``): returns ``(synsets, names)``.

    Also reads Kaggle's ``LOC_synset_mapping.txt`` (same format). The synsets must be unique
    and sorted, so that line ``i`` is label ``i`` of the standard order.
    """
    path = pathlib.Path(path)
    synsets, names = [], []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        wnid = fields[0]
        if len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit():
            raise ImagenetFormatError(
                f"{path}:{lineno}: expected a WordNet id like n01440764, got {wnid!r}"
            )
        if synsets and wnid <= synsets[-1]:
            raise ImagenetFormatError(
                f"{path}:{lineno}: synset {wnid} is out of sorted order "
                f"or repeated (after {synsets[-1]})"
            )
        synsets.append(wnid)
        names.append(fields[1].strip() if len(fields) > 1 else wnid)
    if not synsets:
        raise ImagenetFormatError(f"{path}: no synsets")
    return tuple(synsets), tuple(names)


def _csv_rows(path: pathlib.Path, n_fields: int) -> list[tuple[str, list[str]]]:
    rows = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != n_fields:
            raise ImagenetFormatError(
                f"{path}:{lineno}: expected {n_fields} comma-separated fields, got "
                f"{len(fields)}: {line.strip()!r}"
            )
        rows.append((f"{path}:{lineno}", fields))
    return rows


def _label(where: str, text: str, n_classes: int) -> int:
    try:
        label = int(text)
    except ValueError:
        raise ImagenetFormatError(f"{where}: label is not an integer: {text!r}") from None
    if not 0 <= label < n_classes:
        raise ImagenetFormatError(f"{where}: label {label} out of range 0..{n_classes - 1}")
    return label


def _box(where: str, values: Sequence[str]) -> list[float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except ValueError:
        raise ImagenetFormatError(f"{where}: box values are not numbers: {list(values)}") from None
    if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0):
        raise ImagenetFormatError(
            f"{where}: invalid box {[x0, y0, x1, y1]} (need 0 <= x0 < x1, 0 <= y0 < y1)"
        )
    return [x0, y0, x1, y1]


def read_labels_file(path: str | os.PathLike[str], n_classes: int = NUM_CLASSES) -> dict[str, int]:
    """Reads a label file: ``val/NAME,label`` (CSV) or ``NAME label`` (Caffe ``val.txt``).

    Returns ``{basename: label}``; duplicates and bad labels raise naming file and line.
    """
    path = pathlib.Path(path)
    out: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split(",") if "," in line else line.split()
        where = f"{path}:{lineno}"
        if len(fields) != 2:
            raise ImagenetFormatError(
                f"{where}: expected 'NAME,label' or 'NAME label', got {line.strip()!r}"
            )
        name = os.path.basename(fields[0].strip())
        if name in out:
            raise ImagenetFormatError(f"{where}: duplicate image {name}")
        out[name] = _label(where, fields[1].strip(), n_classes)
    return out


# ----------------------------------------------------------------------------- layouts


def _read_wsol(root: pathlib.Path, synset_words: pathlib.Path) -> ImagenetAnnotations:
    synsets, class_names = read_synset_words(synset_words)
    index: dict[str, int] = {}
    names, labels = [], []
    for where, (name, label) in _csv_rows(root / "class_labels.txt", 2):
        if name in index:
            raise ImagenetFormatError(f"{where}: duplicate image {name}")
        if not (root / name).is_file():
            raise ImagenetFormatError(f"{where}: image file not found: {root / name}")
        index[name] = len(names)
        names.append(name)
        labels.append(_label(where, label, len(synsets)))
    if not names:
        raise ImagenetFormatError(f"{root / 'class_labels.txt'}: no images listed")
    boxes: list[list[list[float]]] = [[] for _ in names]
    for where, fields in _csv_rows(root / "localization.txt", 5):
        if fields[0] not in index:
            raise ImagenetFormatError(
                f"{where}: unknown image {fields[0]} (not in class_labels.txt)"
            )
        boxes[index[fields[0]]].append(_box(where, fields[1:]))
    missing = [n for n, b in zip(names, boxes) if not b]
    if missing:
        raise ImagenetFormatError(
            f"{root / 'localization.txt'}: no box for {len(missing)} image(s), first {missing[0]}"
        )
    return ImagenetAnnotations(
        root=root,
        names=np.asarray(names),
        paths=np.asarray([str(root / n) for n in names]),
        labels=np.asarray(labels, np.int64),
        boxes=tuple(np.asarray(b, np.float32).reshape(-1, 4) for b in boxes),
        synsets=synsets,
        class_names=class_names,
    )


def _xml_int(obj: ET.Element, tag: str, where: str) -> float:
    node = obj.find(tag)
    if node is None or node.text is None:
        raise ImagenetFormatError(f"{where}: missing <{tag}>")
    try:
        return float(node.text.strip())
    except ValueError:
        raise ImagenetFormatError(f"{where}: <{tag}> is not a number: {node.text!r}") from None


def _xml_size(size: ET.Element, tag: str, path: pathlib.Path) -> int:
    value = _xml_int(size, tag, f"{path} <size>")
    if not (np.isfinite(value) and value == int(value) and value > 0):
        raise ImagenetFormatError(f"{path} <size>: <{tag}> must be a positive integer, got {value}")
    return int(value)


def parse_ilsvrc_xml(
    path: str | os.PathLike[str],
) -> tuple[str, tuple[int, int], list[tuple[str, list[float]]]]:
    """Parses one ILSVRC (PASCAL-VOC-style) annotation XML.

    Returns:
      ``(filename, (height, width), [(synset, [x0, y0, x1, y1]), ...])`` with the ``bndbox``
      values unchanged.
    """
    path = pathlib.Path(path)
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise ImagenetFormatError(f"{path}:{e.position[0]}: malformed XML ({e})") from None
    except OSError as e:
        raise ImagenetFormatError(f"{path}: cannot read ({e})") from None
    ann = tree.getroot()
    filename = ann.findtext("filename", default=path.stem).strip() or path.stem
    size = ann.find("size")
    if size is None:
        raise ImagenetFormatError(f"{path}: missing <size>")
    hw = (_xml_size(size, "height", path), _xml_size(size, "width", path))
    objects = []
    for k, obj in enumerate(ann.iter("object")):
        where = f"{path} <object> #{k + 1}"
        synset = (obj.findtext("name") or "").strip()
        if not synset:
            raise ImagenetFormatError(f"{where}: missing <name>")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ImagenetFormatError(f"{where}: missing <bndbox>")
        values = [_xml_int(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((synset, _box(where, [str(v) for v in values])))
    if not objects:
        raise ImagenetFormatError(f"{path}: no <object>")
    return filename, hw, objects


def read_imagenet_xml(
    xml_dir: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    synset_words: str | os.PathLike[str],
    labels_file: str | os.PathLike[str] | None = None,
    image_ext: str = ".JPEG",
) -> ImagenetAnnotations:
    """Reads a folder of ILSVRC validation XML files (one per image, ``*.xml``).

    The label of an image is the index of its objects' synset in ``synset_words``; every object
    of a validation image must share it. With ``labels_file`` (see :func:`read_labels_file`)
    each image's label is cross-checked against it. Images are ``image_dir / (stem +
    image_ext)`` and must exist. Returned ``names`` are relative to ``image_dir``'s parent.
    """
    xml_dir, image_dir = pathlib.Path(xml_dir), pathlib.Path(image_dir)
    synsets, class_names = read_synset_words(synset_words)
    label_of = {s: i for i, s in enumerate(synsets)}
    given = read_labels_file(labels_file, len(synsets)) if labels_file is not None else None
    xml_files = sorted(xml_dir.glob("*.xml"))
    if not xml_files:
        raise ImagenetFormatError(f"{xml_dir}: no *.xml files")
    names, paths, labels, boxes, sizes = [], [], [], [], []
    for xml in xml_files:
        _, hw, objects = parse_ilsvrc_xml(xml)
        found = {s for s, _ in objects}
        if len(found) != 1:
            raise ImagenetFormatError(f"{xml}: objects of several synsets {sorted(found)}")
        synset = found.pop()
        if synset not in label_of:
            raise ImagenetFormatError(f"{xml}: synset {synset} not in {synset_words}")
        label = label_of[synset]
        image = image_dir / (xml.stem + image_ext)
        if not image.is_file():
            raise ImagenetFormatError(f"{xml}: image file not found: {image}")
        if given is not None:
            if image.name not in given:
                raise ImagenetFormatError(f"{labels_file}: no label for {image.name}")
            if given[image.name] != label:
                raise ImagenetFormatError(
                    f"{labels_file}: label {given[image.name]} for {image.name} disagrees with "
                    f"{xml} (synset {synset} = label {label})"
                )
        box = np.asarray([b for _, b in objects], np.float32)
        h, w = hw
        if (box[:, 2] > w).any() or (box[:, 3] > h).any():
            raise ImagenetFormatError(f"{xml}: box {box.tolist()} exceeds <size> {w}x{h}")
        names.append(f"{image_dir.name}/{image.name}")
        paths.append(str(image.resolve()))
        labels.append(label)
        boxes.append(box)
        sizes.append(hw)
    return ImagenetAnnotations(
        root=image_dir.parent.resolve(),
        names=np.asarray(names),
        paths=np.asarray(paths),
        labels=np.asarray(labels, np.int64),
        boxes=tuple(boxes),
        synsets=synsets,
        class_names=class_names,
        image_sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
    )


def read_imagenet_val(root: str | os.PathLike[str]) -> ImagenetAnnotations:
    """Reads ILSVRC validation annotations from ``root``, detecting the layout.

    * ``root/localization.txt`` + ``class_labels.txt`` + ``synset_words.txt``: wsolevaluation.
    * ``root/ILSVRC/Annotations/CLS-LOC/val/*.xml`` (images in ``ILSVRC/Data/CLS-LOC/val``,
      synsets in ``root/LOC_synset_mapping.txt`` or ``root/synset_words.txt``): Kaggle layout.
    * ``root/val/*.xml`` beside ``root/val/*.JPEG`` and ``root/synset_words.txt``; a
      ``root/val.txt`` label file, if present, is cross-checked.

    For other arrangements call :func:`read_imagenet_xml` directly.
    """
    root = pathlib.Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ImagenetFormatError(f"{root}: not a directory")
    synset_candidates = [root / "synset_words.txt", root / "LOC_synset_mapping.txt"]
    synset_words = next((p for p in synset_candidates if p.is_file()), synset_candidates[0])
    if (root / "localization.txt").is_file():
        return _read_wsol(root, synset_words)
    kaggle = root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    if kaggle.is_dir():
        return read_imagenet_xml(kaggle, root / "ILSVRC" / "Data" / "CLS-LOC" / "val", synset_words)
    if any((root / "val").glob("*.xml")):
        labels = root / "val.txt"
        return read_imagenet_xml(
            root / "val", root / "val", synset_words, labels if labels.is_file() else None
        )
    raise ImagenetFormatError(
        f"{root}: no ImageNet validation annotations (expected localization.txt, val/*.xml or "
        "ILSVRC/Annotations/CLS-LOC/val)"
    )
