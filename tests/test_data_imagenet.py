"""ILSVRC validation readers: wsolevaluation text layout and official XML layout."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import pytest
from PIL import Image

from fgloc.data import imagenet, pipeline

SYNSETS = ["n01440764", "n01443537", "n01751748"]


def _synset_words(path: pathlib.Path, synsets=SYNSETS) -> pathlib.Path:
    names = {
        "n01440764": "tench, Tinca tinca",
        "n01443537": "goldfish, Carassius auratus",
        "n01751748": "sea snake",
    }
    path.write_text("".join(f"{s} {names.get(s, s)}\n" for s in synsets))
    return path


def _jpeg(path: pathlib.Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 30)).save(path)


def make_wsol(root: pathlib.Path) -> pathlib.Path:
    _synset_words(root / "synset_words.txt")
    _jpeg(root / "val" / "a.JPEG", 40, 30)
    _jpeg(root / "val" / "b.JPEG", 20, 20)
    (root / "class_labels.txt").write_text("val/a.JPEG,2\nval/b.JPEG,0\n")
    (root / "localization.txt").write_text(
        "val/a.JPEG,1,2,30,25\nval/b.JPEG,0,0,20,20\nval/a.JPEG,5,6,7,8\n"
    )
    return root


def _replace_line(path: pathlib.Path, lineno: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_wsol_layout_values(tmp_path: pathlib.Path):
    ann = imagenet.read_imagenet_val(make_wsol(tmp_path))
    assert len(ann) == 2
    np.testing.assert_array_equal(ann.names, ["val/a.JPEG", "val/b.JPEG"])
    np.testing.assert_array_equal(ann.labels, [2, 0])
    np.testing.assert_array_equal(ann.boxes[0], [[1, 2, 30, 25], [5, 6, 7, 8]])
    np.testing.assert_array_equal(ann.boxes[1], [[0, 0, 20, 20]])
    assert ann.synsets[2] == "n01751748" and ann.class_names[0] == "tench, Tinca tinca"
    assert ann.paths[1] == str(tmp_path.resolve() / "val" / "b.JPEG")
    assert ann.image_sizes is None


WSOL_BAD = {
    "field count": ("localization.txt", 2, "val/b.JPEG,0,0,20", r"localization\.txt:2: expected 5"),
    "unknown image": (
        "localization.txt",
        3,
        "val/c.JPEG,5,6,7,8",
        r"localization\.txt:3: unknown image val/c\.JPEG",
    ),
    "empty box": (
        "localization.txt",
        1,
        "val/a.JPEG,5,2,5,25",
        r"localization\.txt:1: invalid box",
    ),
    "label range": ("class_labels.txt", 2, "val/b.JPEG,3", r"class_labels\.txt:2: label 3 out of"),
    "label text": ("class_labels.txt", 1, "val/a.JPEG,two", r"class_labels\.txt:1: label is not"),
    "missing image": (
        "class_labels.txt",
        2,
        "val/z.JPEG,0",
        r"class_labels\.txt:2: image file not found",
    ),
    "synset order": (
        "synset_words.txt",
        3,
        "n01440000 fish",
        r"synset_words\.txt:3: synset n01440000 is out of sorted order",
    ),
    "synset id": ("synset_words.txt", 1, "tench fish", r"synset_words\.txt:1: expected a WordNet"),
    "duplicate image": (
        "class_labels.txt",
        2,
        "val/a.JPEG,0",
        r"class_labels\.txt:2: duplicate image val/a\.JPEG",
    ),
    "label field count": (
        "class_labels.txt",
        1,
        "val/a.JPEG",
        r"class_labels\.txt:1: expected 2 comma-separated fields, got 1",
    ),
    "box not a number": (
        "localization.txt",
        3,
        "val/a.JPEG,5,6,x,8",
        r"localization\.txt:3: box values are not numbers",
    ),
    "box negative": (
        "localization.txt",
        2,
        "val/b.JPEG,-1,0,20,20",
        r"localization\.txt:2: invalid box",
    ),
    "synset repeated": (
        "synset_words.txt",
        2,
        "n01440764 tench again",
        r"synset_words\.txt:2: synset n01440764 is out of sorted order or repeated",
    ),
}


@pytest.mark.parametrize("case", sorted(WSOL_BAD))
def test_wsol_malformed_names_file_and_line(tmp_path: pathlib.Path, case: str):
    root = make_wsol(tmp_path)
    name, lineno, new, pattern = WSOL_BAD[case]
    _replace_line(root / name, lineno, new)
    with pytest.raises(imagenet.ImagenetFormatError, match=pattern):
        imagenet.read_imagenet_val(root)


def test_wsol_image_without_box(tmp_path: pathlib.Path):
    root = make_wsol(tmp_path)
    (root / "localization.txt").write_text("val/a.JPEG,1,2,30,25\n")
    with pytest.raises(imagenet.ImagenetFormatError, match=r"no box for 1 image\(s\), first val/b"):
        imagenet.read_imagenet_val(root)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("class_labels.txt", r"class_labels\.txt: file not found"),
        ("synset_words.txt", r"synset_words\.txt: file not found"),
    ],
)
def test_wsol_missing_file_names_it(tmp_path: pathlib.Path, name: str, pattern: str):
    root = make_wsol(tmp_path)
    (root / name).unlink()
    with pytest.raises(imagenet.ImagenetFormatError, match=pattern):
        imagenet.read_imagenet_val(root)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("class_labels.txt", r"class_labels\.txt: no images listed"),
        ("synset_words.txt", r"synset_words\.txt: no synsets"),
    ],
)
def test_wsol_empty_file_names_it(tmp_path: pathlib.Path, name: str, pattern: str):
    root = make_wsol(tmp_path)
    (root / name).write_text("\n")
    with pytest.raises(imagenet.ImagenetFormatError, match=pattern):
        imagenet.read_imagenet_val(root)


@pytest.mark.parametrize("name", ["class_labels.txt", "localization.txt", "synset_words.txt"])
def test_wsol_not_utf8_names_file_and_line(tmp_path: pathlib.Path, name: str):
    """A stray Latin-1 byte on line 2 is an ImagenetFormatError naming file and line, not a
    bare UnicodeDecodeError."""
    root = make_wsol(tmp_path)
    lines = (root / name).read_bytes().split(b"\n")
    lines[1] = lines[1] + b"\xe9"
    (root / name).write_bytes(b"\n".join(lines))
    with pytest.raises(imagenet.ImagenetFormatError, match=rf"{name}:2: not UTF-8 text"):
        imagenet.read_imagenet_val(root)


def _xml(name: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{s}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for s, b in objects
    )
    return (
        f"<annotation><folder>val</folder><filename>{name}</filename><source>"
        f"<database>ILSVRC_2012</database></source><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}"
        "</annotation>\n"
    )


def make_xml(root: pathlib.Path) -> pathlib.Path:
    """ILSVRC XML layout: root/val/{*.xml, *.JPEG} + root/synset_words.txt."""
    _synset_words(root / "synset_words.txt")
    val = root / "val"
    _jpeg(val / "ILSVRC2012_val_00000001.JPEG", 500, 375)
    _jpeg(val / "ILSVRC2012_val_00000002.JPEG", 60, 80)
    # The first image's real box (wsolevaluation's localization.txt row 1).
    (val / "ILSVRC2012_val_00000001.xml").write_text(
        _xml("ILSVRC2012_val_00000001", 500, 375, [("n01751748", (111, 108, 441, 193))])
    )
    (val / "ILSVRC2012_val_00000002.xml").write_text(
        _xml(
            "ILSVRC2012_val_00000002",
            60,
            80,
            [("n01443537", (1, 2, 30, 40)), ("n01443537", (10, 20, 60, 80))],
        )
    )
    return root


def test_xml_layout_values(tmp_path: pathlib.Path):
    ann = imagenet.read_imagenet_val(make_xml(tmp_path))
    np.testing.assert_array_equal(
        ann.names, ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    )
    np.testing.assert_array_equal(ann.labels, [2, 1])
    np.testing.assert_array_equal(ann.boxes[0], [[111, 108, 441, 193]])
    np.testing.assert_array_equal(ann.boxes[1], [[1, 2, 30, 40], [10, 20, 60, 80]])
    assert ann.image_sizes is not None
    np.testing.assert_array_equal(ann.image_sizes, [[375, 500], [80, 60]])


def test_xml_layout_labels_file_cross_check(tmp_path: pathlib.Path):
    root = make_xml(tmp_path)
    (root / "val.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 1\n"
    )
    assert imagenet.read_imagenet_val(root).labels.tolist() == [2, 1]
    (root / "val.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 0\n"
    )
    with pytest.raises(imagenet.ImagenetFormatError, match=r"val\.txt: label 0 for .*disagrees"):
        imagenet.read_imagenet_val(root)


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (  # the labels file lacks the second image
            "ILSVRC2012_val_00000001.JPEG 2\n",
            r"val\.txt: no label for ILSVRC2012_val_00000002\.JPEG",
        ),
        (
            "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000001.JPEG 2\n",
            r"val\.txt:2: duplicate image ILSVRC2012_val_00000001\.JPEG",
        ),
        (
            "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 1 extra\n",
            r"val\.txt:2: expected 'NAME,label' or 'NAME label'",
        ),
        (
            "ILSVRC2012_val_00000001.JPEG 3\n",
            r"val\.txt:1: label 3 out of range 0\.\.2",
        ),
        (
            "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG one\n",
            r"val\.txt:2: label is not an integer",
        ),
    ],
)
def test_xml_labels_file_malformed(tmp_path: pathlib.Path, labels: str, pattern: str):
    root = make_xml(tmp_path)
    (root / "val.txt").write_text(labels)
    with pytest.raises(imagenet.ImagenetFormatError, match=pattern):
        imagenet.read_imagenet_val(root)


def test_xml_missing_image_and_no_xml(tmp_path: pathlib.Path):
    root = make_xml(tmp_path)
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(
        imagenet.ImagenetFormatError,
        match=r"00000002\.xml: image file not found: .*ILSVRC2012_val_00000002\.JPEG",
    ):
        imagenet.read_imagenet_val(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(imagenet.ImagenetFormatError, match=r"empty: no \*\.xml files"):
        imagenet.read_imagenet_xml(tmp_path / "empty", root / "val", root / "synset_words.txt")


def test_kaggle_layout(tmp_path: pathlib.Path):
    xml_dir = tmp_path / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    img_dir = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    xml_dir.mkdir(parents=True)
    _jpeg(img_dir / "ILSVRC2012_val_00000009.JPEG", 30, 20)
    (xml_dir / "ILSVRC2012_val_00000009.xml").write_text(
        _xml("ILSVRC2012_val_00000009", 30, 20, [("n01440764", (0, 0, 30, 20))])
    )
    _synset_words(tmp_path / "LOC_synset_mapping.txt")
    ann = imagenet.read_imagenet_val(tmp_path)
    assert ann.labels.tolist() == [0]
    assert pathlib.Path(ann.paths[0]) == (img_dir / "ILSVRC2012_val_00000009.JPEG").resolve()


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("<annotation><size><width>5</width>", r"00000002\.xml:1: malformed XML"),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40)), ("n01440764", (1, 2, 3, 4))]),
            r"00000002\.xml: objects of several synsets",
        ),
        (_xml("x", 60, 80, [("n09999999", (1, 2, 30, 40))]), r"synset n09999999 not in"),
        (_xml("x", 60, 80, [("n01443537", (1, 2, 61, 40))]), r"exceeds <size> 60x80"),
        (_xml("x", 60, 80, []), r"00000002\.xml: no <object>"),
        (_xml("x", 60, 80, [("n01443537", (9, 2, 3, 40))]), r"<object> #1: invalid box"),
        ("", r"00000002\.xml:1: malformed XML"),
        ("<annotation><object/></annotation>", r"00000002\.xml: missing <size>"),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace("<height>80</height>", ""),
            r"00000002\.xml <size>: missing <height>",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace(">80<", ">eighty<"),
            r"00000002\.xml <size>: <height> is not a number: 'eighty'",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace(">80<", ">nan<"),
            r"00000002\.xml <size>: <height> must be a positive integer, got nan",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace(">60<", ">0<"),
            r"00000002\.xml <size>: <width> must be a positive integer, got 0",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace(">80<", ">80.5<"),
            r"00000002\.xml <size>: <height> must be a positive integer, got 80\.5",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace(
                "<name>n01443537</name>", ""
            ),
            r"00000002\.xml <object> #1: missing <name>",
        ),
        (
            "<annotation><size><width>60</width><height>80</height></size>"
            "<object><name>n01443537</name></object></annotation>",
            r"00000002\.xml <object> #1: missing <bndbox>",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40)), ("n01443537", (1, 2, 3, 4))]).replace(
                "<ymax>4</ymax>", ""
            ),
            r"00000002\.xml <object> #2: missing <ymax>",
        ),
        (
            _xml("x", 60, 80, [("n01443537", (1, 2, 30, 40))]).replace(
                "<xmin>1</xmin>", "<xmin>one</xmin>"
            ),
            r"00000002\.xml <object> #1: <xmin> is not a number: 'one'",
        ),
    ],
)
def test_xml_malformed_names_file(tmp_path: pathlib.Path, content: str, pattern: str):
    root = make_xml(tmp_path)
    (root / "val" / "ILSVRC2012_val_00000002.xml").write_text(content)
    with pytest.raises(imagenet.ImagenetFormatError, match=pattern):
        imagenet.read_imagenet_val(root)


def test_xml_unreadable_file_names_it(tmp_path: pathlib.Path):
    root = make_xml(tmp_path)
    xml = root / "val" / "ILSVRC2012_val_00000002.xml"
    xml.unlink()
    xml.mkdir()  # *.xml that cannot be read as a file
    with pytest.raises(imagenet.ImagenetFormatError, match=r"00000002\.xml: cannot read"):
        imagenet.read_imagenet_val(root)


def test_unknown_layout(tmp_path: pathlib.Path):
    with pytest.raises(imagenet.ImagenetFormatError, match="no ImageNet validation annotations"):
        imagenet.read_imagenet_val(tmp_path)


def test_source_pads_boxes_and_feeds_pipeline(tmp_path: pathlib.Path):
    ann = imagenet.read_imagenet_val(make_wsol(tmp_path))
    src = ann.as_source(max_boxes=3)
    ex = src[0]
    np.testing.assert_array_equal(ex["boxes"], [[1, 2, 30, 25], [5, 6, 7, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ex["boxes_valid"], [True, True, False])
    with pytest.raises(ValueError, match="max_boxes=1"):
        ann.as_source(max_boxes=1)
    batch = pipeline.make_pipeline(src, size=20, batch_size=2)[0]
    assert batch is not None
    assert batch["image"].shape == (2, 20, 20, 3)
    # a.JPEG is 40 x 30 -> 20 x 20: s = (0.5, 2/3).
    np.testing.assert_allclose(batch["boxes"][0, 0], [0.5, 4 / 3, 15, 50 / 3], rtol=1e-6)


@pytest.mark.real_data
def test_real_sample(imagenet_dir: pathlib.Path):
    ann = imagenet.read_imagenet_val(imagenet_dir)
    # The counts, straight from the text files (one box per line of localization.txt).
    text = (imagenet_dir / "localization.txt").read_text().splitlines()
    per_image = collections.Counter(line.split(",")[0] for line in text if line.strip())
    listed = [ln for ln in (imagenet_dir / "class_labels.txt").read_text().splitlines() if ln]
    assert (len(listed), len(per_image), sum(per_image.values())) == (50, 50, 111)
    assert per_image.most_common(1) == [("val/ILSVRC2012_val_00000320.JPEG", 10)]
    assert len(ann) == 50
    assert sum(len(b) for b in ann.boxes) == 111
    assert {str(n): len(b) for n, b in zip(ann.names, ann.boxes)} == dict(per_image)
    assert len(ann.synsets) == 1000 and ann.synsets == tuple(sorted(ann.synsets))
    # class_labels.txt line 1: "val/ILSVRC2012_val_00000001.JPEG,65" -- the sea snake.
    assert ann.names[0] == "val/ILSVRC2012_val_00000001.JPEG"
    assert ann.labels[0] == 65 and ann.synsets[65] == "n01751748"
    assert ann.class_names[65] == "sea snake"
    np.testing.assert_array_equal(ann.boxes[0], [[111, 108, 441, 193]])
    i = int(np.flatnonzero(ann.names == "val/ILSVRC2012_val_00000320.JPEG")[0])
    assert len(ann.boxes[i]) == 10  # the image with the most boxes
    # Every box lies inside its stored (cropped) image.
    for path, boxes in zip(ann.paths, ann.boxes):
        with Image.open(path) as im:
            assert (boxes[:, 2] <= im.width).all() and (boxes[:, 3] <= im.height).all()
