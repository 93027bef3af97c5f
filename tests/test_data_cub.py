"""CUB-200-2011 reader and TFDS builder: a hand-made 3-image fixture, malformed variants, and
(when ../shared/data is present) the real 1,402-image subset."""

from __future__ import annotations

import io
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from fgloc.data import cub, pipeline

# --------------------------------------------------------------------------- tiny fixture

# (image id, file name, class id, is_train, (width, height), mode, "x y w h")
TINY = [
    (5, "001.Black_footed_Albatross/Albatross_5.jpg", 1, 1, (40, 30), "RGB", "3.0 4.0 10.0 20.0"),
    (9, "001.Black_footed_Albatross/Albatross_9.jpg", 1, 0, (20, 25), "L", "0 0 25 30"),
    (11790, "200.Common_Yellowthroat/Yellowthroat_11790.jpg", 200, 1, (50, 10), "RGB", "45 2 10 5"),
]
EXPECTED_BOXES = np.array([[3, 4, 13, 24], [0, 0, 20, 25], [45, 2, 50, 7]], np.float32)


def _part(k: int, p: int) -> tuple[int, int, int]:
    """Part ``p`` (1..15) of the ``k``-th tiny image: ``(x, y, visible)``."""
    visible = int((p + k) % 3 == 0)
    return (p + k, p // 2 + k, visible) if visible else (0, 0, 0)


def make_cub(parent: pathlib.Path) -> pathlib.Path:
    """Writes a CUB-format folder ``parent/CUB_200_2011`` with the 3 images of ``TINY``."""
    root = parent / "CUB_200_2011"
    (root / "parts").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _, name, _, _, (w, h), mode, _ in TINY:
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
    classes = [f"{i:03d}.Class_{i}" for i in range(1, 201)]
    classes[0], classes[199] = "001.Black_footed_Albatross", "200.Common_Yellowthroat"
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    (root / "parts" / "parts.txt").write_text(
        "".join(f"{i} {n}\n" for i, n in enumerate(cub.PART_NAMES, 1))
    )
    (root / "images.txt").write_text("".join(f"{t[0]} {t[1]}\n" for t in TINY))
    (root / "image_class_labels.txt").write_text("".join(f"{t[0]} {t[2]}\n" for t in TINY))
    (root / "train_test_split.txt").write_text("".join(f"{t[0]} {t[3]}\n" for t in TINY))
    (root / "bounding_boxes.txt").write_text("".join(f"{t[0]} {t[6]}\n" for t in TINY))
    rows = [
        f"{t[0]} {p} {float(x)} {float(y)} {v}\n"
        for k, t in enumerate(TINY)
        for p in range(1, 16)
        for x, y, v in [_part(k, p)]
    ]
    (root / "parts" / "part_locs.txt").write_text("".join(rows))
    return root


def make_tgz(folder: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="CUB_200_2011")
    return archive


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return make_cub(tmp_path / "manual")


def test_read_cub_folder_values(tiny: pathlib.Path):
    ann = cub.read_cub(tiny.parent)
    assert len(ann) == 3
    np.testing.assert_array_equal(ann.image_ids, [5, 9, 11790])
    np.testing.assert_array_equal(ann.labels, [0, 0, 199])
    np.testing.assert_array_equal(ann.is_train, [True, False, True])
    np.testing.assert_array_equal(ann.image_sizes, [[30, 40], [25, 20], [10, 50]])
    # x y w h -> [x, y, x + w, y + h], clipped to [0, W] x [0, H].
    np.testing.assert_array_equal(ann.boxes, EXPECTED_BOXES)
    assert ann.boxes.dtype == np.float32
    for k in range(3):
        for p in range(1, 16):
            x, y, v = _part(k, p)
            np.testing.assert_array_equal(ann.parts[k, p - 1], [x, y])
            assert ann.visible[k, p - 1] == bool(v)
    assert ann.class_names[0] == "001.Black_footed_Albatross"
    assert ann.class_names[199] == "200.Common_Yellowthroat"
    assert ann.part_names == cub.PART_NAMES
    assert ann.paths[1] == str(tiny / "images" / TINY[1][1])
    train = ann.split("train")
    np.testing.assert_array_equal(train.image_ids, [5, 11790])
    np.testing.assert_array_equal(train.parts, ann.parts[[0, 2]])
    assert ann.split("all") is ann


@pytest.mark.parametrize("where", ["parent", "folder", "archive", "archive_parent"])
def test_read_cub_tgz_equals_folder(tiny: pathlib.Path, tmp_path: pathlib.Path, where: str):
    folder = cub.read_cub(tiny)
    arch_dir = tmp_path / "arch"
    arch_dir.mkdir()
    archive = make_tgz(tiny, arch_dir / cub.ARCHIVE_NAME)
    path = {"parent": tiny.parent, "folder": tiny, "archive": archive, "archive_parent": arch_dir}[
        where
    ]
    ann = cub.read_cub(path)
    assert ann.is_archive == where.startswith("archive")
    for field in (
        "image_ids",
        "file_names",
        "labels",
        "boxes",
        "parts",
        "visible",
        "is_train",
        "image_sizes",
    ):
        np.testing.assert_array_equal(getattr(ann, field), getattr(folder, field), err_msg=field)
    assert ann.class_names == folder.class_names
    # The image bytes come out the same both ways.
    got = dict(cub.iter_image_bytes(ann))
    for i, name in enumerate(folder.file_names):
        assert got[i] == (tiny / "images" / name).read_bytes()


def _replace_line(path: pathlib.Path, lineno: int, new: str | None) -> None:
    lines = path.read_text().splitlines(keepends=True)
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new + "\n"
    path.write_text("".join(lines))


MALFORMED = {
    "missing image": (lambda r: (r / "images" / TINY[1][1]).unlink(), r"images\.txt:2: image file"),
    "field count": (
        lambda r: _replace_line(r / "bounding_boxes.txt", 2, "9 0 0 25"),
        r"bounding_boxes\.txt:2: expected 5 fields, got 4",
    ),
    "part id": (
        lambda r: _replace_line(r / "parts" / "part_locs.txt", 17, "9 16 1.0 1.0 1"),
        r"part_locs\.txt:17: part id 16 out of range 1\.\.15",
    ),
    "unknown id labels": (
        lambda r: _replace_line(r / "image_class_labels.txt", 3, "12 1"),
        r"image_class_labels\.txt:3: unknown image id 12",
    ),
    "unknown id parts": (
        lambda r: _replace_line(r / "parts" / "part_locs.txt", 1, "6 1 0 0 0"),
        r"part_locs\.txt:1: unknown image id 6",
    ),
    "class id": (
        lambda r: _replace_line(r / "image_class_labels.txt", 1, "5 201"),
        r"image_class_labels\.txt:1: class id 201 out of range",
    ),
    "not a number": (
        lambda r: _replace_line(r / "bounding_boxes.txt", 1, "5 3 4 ten 20"),
        r"bounding_boxes\.txt:1: field 4 is not a number",
    ),
    "duplicate image id": (
        lambda r: _replace_line(r / "images.txt", 2, "5 x.jpg"),
        r"images\.txt:2: duplicate image id 5",
    ),
    "missing part row": (
        lambda r: _replace_line(r / "parts" / "part_locs.txt", 20, None),
        r"part_locs\.txt: 1 \(image, part\) pair\(s\) missing, first image id 9 "
        r"part 5",
    ),
    "missing split row": (
        lambda r: _replace_line(r / "train_test_split.txt", 3, None),
        r"train_test_split\.txt: no row for 1 image id\(s\), first 11790",
    ),
    "split flag": (
        lambda r: _replace_line(r / "train_test_split.txt", 3, "11790 2"),
        r"train_test_split\.txt:3: is_training_image must be 0 or 1",
    ),
    "duplicate box row": (
        lambda r: _replace_line(r / "bounding_boxes.txt", 3, "9 0 0 5 5"),
        r"bounding_boxes\.txt:3: duplicate row for image id 9",
    ),
    "duplicate part row": (
        lambda r: _replace_line(r / "parts" / "part_locs.txt", 2, "5 1 0 0 0"),
        r"part_locs\.txt:2: duplicate row for image 5 part 1",
    ),
    "box not finite": (
        lambda r: _replace_line(r / "bounding_boxes.txt", 1, "5 3 4 nan 20"),
        r"bounding_boxes\.txt:1: field 4 is not finite",
    ),
    "negative box": (
        lambda r: _replace_line(r / "bounding_boxes.txt", 1, "5 3 4 -10 20"),
        r"bounding_boxes\.txt:1: negative box width or height",
    ),
    "missing file": (
        lambda r: (r / "image_class_labels.txt").unlink(),
        r"image_class_labels\.txt: file not found",
    ),
    "empty classes": (
        lambda r: (r / "classes.txt").write_text(""),
        r"classes\.txt: file is empty",
    ),
    "not utf-8": (
        lambda r: (r / "images.txt").write_bytes(
            (r / "images.txt").read_bytes().replace(b"Albatross_9", b"Albatross_\xe9")
        ),
        r"images\.txt:2: not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_read_cub_malformed_names_file_and_line(tiny: pathlib.Path, case: str):
    mutate, pattern = MALFORMED[case]
    mutate(tiny)
    with pytest.raises(cub.CubFormatError, match=pattern):
        cub.read_cub(tiny.parent)


def test_read_cub_malformed_archive_names_member_and_line(
    tiny: pathlib.Path, tmp_path: pathlib.Path
):
    _replace_line(tiny / "bounding_boxes.txt", 2, "9 0 0 25")
    archive = make_tgz(tiny, tmp_path / cub.ARCHIVE_NAME)
    pattern = r"CUB_200_2011\.tgz:CUB_200_2011/bounding_boxes\.txt:2: expected 5 fields"
    with pytest.raises(cub.CubFormatError, match=pattern):
        cub.read_cub(archive)


def test_read_cub_archive_not_utf8_names_member_and_line(
    tiny: pathlib.Path, tmp_path: pathlib.Path
):
    parts = tiny / "parts" / "parts.txt"
    parts.write_bytes(parts.read_bytes().replace(b"3 belly", b"3 b\xe9lly"))
    archive = make_tgz(tiny, tmp_path / cub.ARCHIVE_NAME)
    pattern = r"CUB_200_2011\.tgz:CUB_200_2011/parts/parts\.txt:3: not UTF-8 text"
    with pytest.raises(cub.CubFormatError, match=pattern):
        cub.read_cub(archive)


def test_read_cub_missing_image_in_archive(tiny: pathlib.Path, tmp_path: pathlib.Path):
    (tiny / "images" / TINY[2][1]).unlink()
    archive = make_tgz(tiny, tmp_path / cub.ARCHIVE_NAME)
    with pytest.raises(cub.CubFormatError, match=r"images\.txt:3: image not in archive"):
        cub.read_cub(archive)


def test_find_cub_errors(tmp_path: pathlib.Path):
    with pytest.raises(cub.CubFormatError, match="no CUB-200-2011 data found"):
        cub.find_cub(tmp_path)
    bogus = tmp_path / "x.tgz"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(cub.CubFormatError, match="not a tar archive"):
        cub.find_cub(bogus)


def test_unreadable_image_header_names_file(tiny: pathlib.Path):
    (tiny / "images" / TINY[0][1]).write_bytes(b"garbage")
    with pytest.raises(cub.CubFormatError, match=r"Albatross_5\.jpg: cannot read image header"):
        cub.read_cub(tiny)


# --------------------------------------------------------------------------- TFDS builder


def _check_prepared(builder: cub.Cub2002011Parts, ann: cub.CubAnnotations, tfds_dir) -> None:
    assert builder.info.splits["train"].num_examples == 2
    assert builder.info.splits["test"].num_examples == 1
    features, metadata = builder.info.features, builder.info.metadata
    assert features is not None and metadata is not None
    assert features["label"].names[199] == "200.Common_Yellowthroat"  # type: ignore[index]
    assert list(metadata["part_names"]) == list(cub.PART_NAMES)
    for split in ("train", "test"):
        src = cub.cub_data_source(split, tfds_dir)
        sub = ann.split(split)
        assert len(src) == len(sub)
        for j in range(len(src)):
            ex = src[j]
            (i,) = np.flatnonzero(sub.image_ids == ex["image_id"])
            assert ex["file_name"].decode() == sub.file_names[i]
            assert ex["label"] == sub.labels[i]
            np.testing.assert_array_equal(ex["bbox"], sub.boxes[i])
            np.testing.assert_array_equal(ex["parts"], sub.parts[i])
            np.testing.assert_array_equal(ex["parts_visible"], sub.visible[i])
            np.testing.assert_array_equal(ex["image_size"], sub.image_sizes[i])
            # The stored image is the original JPEG file, byte for byte.
            assert isinstance(ex["image"], bytes)
            assert ex["image"] == (ann.source / "images" / sub.file_names[i]).read_bytes()


def test_builder_from_folder(tiny: pathlib.Path, tmp_path: pathlib.Path):
    builder = cub.prepare_cub(tiny.parent, tmp_path / "tfds")
    files = sorted(p.name for p in pathlib.Path(builder.data_dir).iterdir())
    assert any(".array_record" in f for f in files), files
    ann = cub.read_cub(tiny)
    _check_prepared(builder, ann, tmp_path / "tfds")


def test_builder_from_tgz(tiny: pathlib.Path, tmp_path: pathlib.Path):
    arch_dir = tmp_path / "arch"
    arch_dir.mkdir()
    make_tgz(tiny, arch_dir / cub.ARCHIVE_NAME)
    builder = cub.prepare_cub(arch_dir, tmp_path / "tfds")
    ann = cub.read_cub(tiny)
    _check_prepared(builder, ann, tmp_path / "tfds")


def test_builder_rejects_malformed(tiny: pathlib.Path, tmp_path: pathlib.Path):
    _replace_line(tiny / "parts" / "part_locs.txt", 17, "9 16 1.0 1.0 1")
    with pytest.raises(cub.CubFormatError, match=r"part_locs\.txt:17"):
        cub.prepare_cub(tiny.parent, tmp_path / "tfds")


# --------------------------------------------------------------------------- CLI


def test_cli_summary(tiny: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    assert cub.main(["--data_dir", str(tiny.parent), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "train: 2\n" in out and "test: 1\n" in out and "total: 3\n" in out
    # Part 3 (belly) is visible in tiny images k with (3 + k) % 3 == 0: k = 0 (train) only.
    assert "   3 belly            1      1      0" in out


def test_cli_prepare(
    tiny: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
):
    assert (
        cub.main(
            ["--data_dir", str(tiny.parent), "--prepare", "--tfds_dir", str(tmp_path / "tfds")]
        )
        == 0
    )
    assert "train: 2, test: 1" in capsys.readouterr().out
    assert len(cub.cub_data_source("test", tmp_path / "tfds")) == 1


def test_cli_error_exit(tiny: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    _replace_line(tiny / "bounding_boxes.txt", 2, "9 0 0 25")
    assert cub.main(["--data_dir", str(tiny.parent), "--summary"]) == 1
    assert "bounding_boxes.txt:2" in capsys.readouterr().err


# --------------------------------------------------------------------------- real data

REAL_VISIBLE = {  # part name: visible count over the 1,402 images (see test docstring)
    "back": 1069,
    "beak": 1398,
    "left eye": 696,
    "tail": 1189,
    "throat": 1383,
}


@pytest.fixture(scope="session")
def real_ann(cub_dir: pathlib.Path) -> cub.CubAnnotations:
    return cub.read_cub(cub_dir.parent)


@pytest.mark.real_data
def test_real_counts_and_spot_values(real_ann: cub.CubAnnotations, cub_dir: pathlib.Path):
    """Counts (the README's, printed by `python -m fgloc.data.cub --data_dir ../shared/data
    --summary`) checked against numpy counts straight from the text files, and values read
    off the text files by hand."""
    ann = real_ann
    root = cub_dir
    split = np.loadtxt(root / "train_test_split.txt", dtype=int)
    labels = np.loadtxt(root / "image_class_labels.txt", dtype=int)
    locs = np.loadtxt(root / "parts" / "part_locs.txt", dtype=float)
    part_ids = {
        name: int(i)
        for i, name in (
            line.split(maxsplit=1)
            for line in (root / "parts" / "parts.txt").read_text().splitlines()
        )
    }
    assert (len(split), int(split[:, 1].sum()), int((split[:, 1] == 0).sum())) == (1402, 750, 652)
    assert len(ann) == 1402
    assert int(ann.is_train.sum()) == 750 and int((~ann.is_train).sum()) == 652
    np.testing.assert_array_equal(ann.is_train, split[np.argsort(split[:, 0]), 1] == 1)
    np.testing.assert_array_equal(np.unique(labels[:, 1]), np.arange(1, 26))
    np.testing.assert_array_equal(np.unique(ann.labels), np.arange(25))
    np.testing.assert_array_equal(ann.image_ids, np.arange(1, 1403))  # original ids 1..1402
    for name, count in REAL_VISIBLE.items():
        rows = locs[locs[:, 1] == part_ids[name]]
        assert int(rows[:, 4].sum()) == count, name  # from part_locs.txt
        assert ann.visible[:, cub.PART_NAMES.index(name)].sum() == count, name
    # Image 1: bounding_boxes "1 60.0 27.0 325.0 304.0", part_locs "1 2 312.0 182.0 1".
    assert ann.file_names[0] == "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    np.testing.assert_array_equal(ann.boxes[0], [60, 27, 385, 331])
    np.testing.assert_array_equal(ann.parts[0, 1], [312, 182])
    assert ann.visible[0, 1] and not ann.visible[0, 0]
    assert not ann.is_train[0]
    # Image 47 (500 x 275): "47 5.0 127.0 496.0 131.0" runs past the right border.
    np.testing.assert_array_equal(ann.image_sizes[46], [275, 500])
    np.testing.assert_array_equal(ann.boxes[46], [5, 127, 500, 258])
    # Every box inside its image after clipping, every visible part inside too.
    h, w = ann.image_sizes[:, 0], ann.image_sizes[:, 1]
    assert (ann.boxes[:, 2] <= w).all() and (ann.boxes[:, 3] <= h).all()
    px, py = ann.parts[..., 0], ann.parts[..., 1]
    assert ((px < w[:, None]) & (py < h[:, None]) | ~ann.visible).all()
    # The two grayscale JPEGs are listed like any other.
    names = set(ann.file_names)
    assert "009.Brewer_Blackbird/Brewer_Blackbird_0028_2682.jpg" in names
    assert "025.Pelagic_Cormorant/Pelagic_Cormorant_0022_23802.jpg" in names


@pytest.fixture(scope="session")
def real_tfds_dir(cub_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """Builds cub200_2011_parts from the real subset once per session (~11 s on 2 cores)."""
    tfds_dir = tmp_path_factory.mktemp("cub_tfds")
    cub.prepare_cub(cub_dir.parent, tfds_dir)
    yield tfds_dir
    shutil.rmtree(tfds_dir, ignore_errors=True)


@pytest.mark.real_data
def test_real_builder(
    real_tfds_dir: pathlib.Path, real_ann: cub.CubAnnotations, cub_dir: pathlib.Path
):
    train = cub.cub_data_source("train", real_tfds_dir)
    test = cub.cub_data_source("test", real_tfds_dir)
    assert (len(train), len(test)) == (750, 652)
    ex = next(test[j] for j in range(len(test)) if test[j]["image_id"] == 1)
    np.testing.assert_array_equal(ex["bbox"], real_ann.boxes[0])
    np.testing.assert_array_equal(ex["parts"], real_ann.parts[0])
    assert ex["image"] == (cub_dir / "images" / real_ann.file_names[0]).read_bytes()
    # The decoded image has the size the reader took from the JPEG header.
    with Image.open(io.BytesIO(ex["image"])) as im:
        assert (im.height, im.width) == tuple(real_ann.image_sizes[0])


@pytest.mark.real_data
def test_real_pipeline_grayscale_image(real_tfds_dir: pathlib.Path, real_ann: cub.CubAnnotations):
    """The grayscale JPEG goes through data_source -> grain pipeline as 3 equal channels, and
    its box crop sends the box to the full output square."""
    name = "009.Brewer_Blackbird/Brewer_Blackbird_0028_2682.jpg"
    i = int(np.flatnonzero(real_ann.file_names == name)[0])
    split = "train" if real_ann.is_train[i] else "test"
    src = cub.cub_data_source(split, real_tfds_dir)
    j = next(j for j in range(len(src)) if src[j]["image_id"] == real_ann.image_ids[i])
    ds = pipeline.make_pipeline([src[j]], size=64, mode="box", batch_size=1)
    batch = ds[0]
    assert batch is not None
    image = batch["image"][0]
    assert image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    np.testing.assert_allclose(batch["bbox"][0], [0, 0, 64, 64], atol=1e-4)
    a = pipeline.crop_resize_affine(real_ann.boxes[i], (64, 64))
    np.testing.assert_allclose(
        batch["parts"][0], pipeline.transform_points(real_ann.parts[i], a), rtol=1e-6
    )
