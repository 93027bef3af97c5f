"""The skip policy of tests/conftest.py (issue 13): under ``CI=true`` a skip fails unless its cause
is an optional extra CI does not install; a skip on the project's own import error always fails.

Each case runs this repository's conftest in a separate pytest process on a probe module, in a
copy of the layout ``REPO/tests/conftest.py`` whose ``../shared/data`` does not exist, once with
``CI=true`` and once without ``CI``; outcomes are read from the JUnit XML report.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import sys

import pytest
from conftest import missing, optional_module, require_module


def test_passes():
    pass


def test_real_data(cub_dir):
    pass


def test_required_module():
    require_module("fgloc_probe_module_that_does_not_exist")


def test_missing_cause():
    missing("the probe's prerequisite is absent")


def test_optional_extra():
    sys.modules["cv2"] = None  # as if OpenCV (the peers extra) were not installed
    optional_module("cv2")


def test_bare_skip():
    pytest.skip("no reason that CI would lack")


@pytest.mark.skip(reason="a skip mark")
def test_skip_mark():
    pass


def test_project_import_error_skipped():
    pytest.importorskip("fgloc.module_that_does_not_exist")


def test_project_import_error_required():
    require_module("fgloc.module_that_does_not_exist")
"""

PROBE_MODULE_SKIP = """
from conftest import require_module

torch_like = require_module("fgloc_probe_module_that_does_not_exist")


def test_never_collected_under_ci():
    pass
"""

#: test -> (outcome with CI=true, outcome without CI); ``tests.test_probe_module`` is the
#: module-level `require_module` (a collection error under CI, a skipped module locally).
EXPECTED = {
    "tests.test_probe_module": ("failed", "skipped"),
    "test_passes": ("passed", "passed"),
    "test_real_data": ("failed", "skipped"),
    "test_required_module": ("failed", "skipped"),
    "test_missing_cause": ("failed", "skipped"),
    "test_optional_extra": ("skipped", "skipped"),
    "test_bare_skip": ("failed", "skipped"),
    "test_skip_mark": ("failed", "skipped"),
    "test_project_import_error_skipped": ("failed", "failed"),
    "test_project_import_error_required": ("failed", "failed"),
}


def _outcomes(root: pathlib.Path, ci: bool) -> tuple[dict[str, str], str]:
    """Runs pytest on ``root/tests``; returns ``{test name: outcome}`` and the output."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    report = root / f"report_ci{int(ci)}.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "tests",
         "--continue-on-collection-errors",
         f"--junitxml={report}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            # a setup error and a call failure both fail the run; "error" wins over a "skipped"
            out[name] = "failed"
        elif "skipped" in tags:
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("skip_policy") / "repo"
    (root / "tests").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "tests" / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (root / "tests" / "test_probe.py").write_text(PROBE)
    (root / "tests" / "test_probe_module.py").write_text(PROBE_MODULE_SKIP)
    assert not (root.parent / "shared" / "data").exists()
    return root


@pytest.mark.parametrize("ci", [True, False], ids=["CI=true", "no CI"])
def test_skip_policy(probe_root: pathlib.Path, ci: bool) -> None:
    outcomes, output = _outcomes(probe_root, ci)
    want = {name: pair[0 if ci else 1] for name, pair in EXPECTED.items()}
    got = {name: outcomes.get(name, "not run") for name in EXPECTED}
    assert got == want, output
    assert "test_never_collected_under_ci" not in outcomes
    if ci:  # each failure says why
        assert "ERROR tests/test_probe_module.py - Failed: CI=true and" in output, output
        assert "FAILED tests/test_probe.py::test_bare_skip - CI=true: this skip" in output
    assert "the project's own code is never a skip" in output, output
