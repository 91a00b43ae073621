"""A plain (non-editable) install ships every subpackage and the data files.

The editable install used for development maps folders by path, so it can hide a package or data file
missing from setup.py; this test installs a built copy into an empty folder and imports from there only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULES = ["tmanet", "tmanet.model", "tmanet.export", "tmanet.engines", "tmanet.runtime", "tmanet.training",
           "tmanet.calibration", "tmanet.synthetic_weights", "tmanet.memory", "tmanet.slots",
           "tmanet.io.ros_images", "tmanet.io.mcap", "tmanet.io.driving_logs", "tmanet.runtime.ros2"]
# Generated or local state that a source checkout may hold but a build must not depend on.
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".hypothesis", "tests", "demo_out")

CHECK = """
import importlib, json, sys
import tmanet
mods = {m: importlib.import_module(m).__file__ for m in json.loads(sys.argv[1])}
from tmanet.synthetic_weights import DATA_DIR, read_manifest
data = sorted(p.name for p in DATA_DIR.glob("*.tsv"))
print(json.dumps({"tmanet": tmanet.__file__, "modules": mods, "data": data,
                  "entries": {n: len(read_manifest(n)) for n in ("cityscapes", "camvid")}}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    # Build from a clean copy: an in-tree build would write build/ and *.egg-info into the shared checkout,
    # and a stale build/lib could mask a file missing from setup.py.
    src = tmp / "src"
    shutil.copytree(REPO_ROOT, src, ignore=IGNORE)
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return target


def test_plain_install_imports_from_the_install_dir(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    # cwd elsewhere so the source tree is not on sys.path; the venv's editable install stays behind PYTHONPATH.
    result = subprocess.run([sys.executable, "-c", CHECK, json.dumps(MODULES)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["tmanet"]).resolve().is_relative_to(installed.resolve())
    for module, file in info["modules"].items():
        assert file and Path(file).resolve().is_relative_to(installed.resolve()), f"{module} imported from {file}"
    assert info["data"] == sorted(["tmanet_r50-d8_cityscapes_state_dict_manifest.tsv",
                                   "tmanet_r50-d8_camvid_state_dict_manifest.tsv"])
    assert info["entries"] == {"cityscapes": 418, "camvid": 466}
    assert (installed / "tmanet" / "data").is_dir()


def test_console_script_is_declared(installed):
    dist_info = list(installed.glob("tmanet_trt-*.dist-info"))
    assert len(dist_info) == 1
    entry_points = (dist_info[0] / "entry_points.txt").read_text()
    assert "tmanet = tmanet.cli:main" in entry_points
