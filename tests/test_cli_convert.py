"""``fgloc convert`` run as a user runs it: the console script, in a subprocess (issue 13, defect 1).

On 53914b5 every call here exited 2 with ``unrecognized arguments: --arch``: the ``convert``
subcommand was parsed by the top-level parser when ``argv`` came from ``sys.argv``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

FGLOC = pathlib.Path(sys.executable).with_name("fgloc")


def _run(*args: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    assert FGLOC.is_file(), f"console script not installed next to {sys.executable}"
    env = {**os.environ, "FGLOC_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [str(FGLOC), "convert", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_convert_help_lists_the_converter_options(tmp_path):
    out = _run("--help", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    for flag in ("--arch", "--from", "--out", "--mean-file"):
        assert flag in out.stdout


def test_convert_lpips_writes_the_packaged_weights(tmp_path):
    from fgloc.pretrained import load_variables
    from fgloc.weights.io import flatten
    from fgloc.weights.lpips import convert_lpips

    dst = tmp_path / "a.npz"
    out = _run("--arch", "alexnet", "--from", "lpips", "--out", str(dst), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and dst.is_file()
    got, want = flatten(load_variables(dst)), flatten(convert_lpips("alexnet"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_convert_torchvision_checkpoint_as_the_readme_writes_it(tmp_path):
    torch = pytest.importorskip("torch")
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    src = tmp_path / "alexnet.pth"
    torch.save(tvm.alexnet(num_classes=10).state_dict(), src)
    dst = tmp_path / "a.npz"
    out = _run("--arch", "alexnet", "--from", "torchvision", str(src), "--out", str(dst), tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    import fgloc

    p = fgloc.pretrained("alexnet", weights=dst)
    assert p.variables["params"]["classifier"]["kernel"].shape == (4096, 10)


def test_convert_bad_arguments_exit_2_with_a_message(tmp_path):
    out = _run("--arch", "nonet", "--from", "torchvision", "x.pth", "--out", str(tmp_path / "o.npz"), tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "--arch must be one of" in out.stderr
    out = _run("--arch", "vgg16", "--from", "torchvision", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o.npz"), tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "missing.pth" in out.stderr
