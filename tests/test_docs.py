"""Every code block of README.md and docs/*.md marked runnable runs, as written, on small sizes.

The marker is the fence's info string: ```` ```bash runnable ```` or ```` ```python runnable ```` (renderers
highlight by the first word only). Any other bash/sh/python block must say on its first line why it is not run
(``# not run by tests/test_docs.py: <reason>``: a GPU, TensorRT, a server, a user's recording, minutes of work),
so that no block is left out by accident.

The blocks of one page run in order, in one temporary folder (a later block may use an earlier one's files),
bash blocks with ``bash -e -o pipefail``, Python blocks with this interpreter. The folder holds what a fresh clone
after ``make demo`` holds and the blocks use: the core package ``tmanet/`` (so the shipped demo model is at
``tmanet/data/demo_model.pth``, and ``import tmanet`` from this folder finds what it finds in the repository),
``demo_out/clip.npy`` (a short synthetic clip of another size than the exports, made by the demo's renderer)
and ``.venv/bin/activate`` (puts this interpreter's ``tmanet`` first on PATH). To take seconds, not minutes,
the sizes in SMALLER are shrunk before running; each must still occur in the blocks, so the list cannot go stale.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}
NOT_RUN = "# not run by tests/test_docs.py:"
# (as written, as run): export and clip sizes, frame counts.
# 96x192, not smaller: the quick start's INT8 gate judges 4 unseen clips, which an export of 64x128 misses
# (98.8 % worst clip, against 99.3 % at 96x192 and 99.5 % at the README's 128x256).
SMALLER = [("--height 128 --width 256", "--height 96 --width 192"),
           ("height=128, width=256", "height=96, width=192"),
           ("frames=24", "frames=8"),
           ("--frames 20", "--frames 5")]
BLOCK_SECONDS = 300  # a hung command fails its block instead of the whole suite


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str  # "bash" or "python"
    runnable: bool
    code: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page}:{self.line}"


FENCE = re.compile(r"^(```+|~~~+)\s*([^`\s]*)\s*(.*)$")


def code_blocks(page: Path) -> list[Block]:
    """The bash and Python blocks of a Markdown page, with their marker."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, rest = m.groups()
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        if lang.lower() in LANGUAGES:
            blocks.append(Block(page, i + 1, LANGUAGES[lang.lower()], "runnable" in rest.split(),
                                "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def smaller(code: str) -> str:
    for written, run in SMALLER:
        code = code.replace(written, run)
    return code


def run_block(block: Block, folder: Path, env: dict) -> subprocess.CompletedProcess:
    code = smaller(block.code)
    cmd = ["bash", "-e", "-o", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_SECONDS)


def check_block(block: Block, folder: Path, env: dict) -> None:
    done = run_block(block, folder, env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        pytest.fail(f"{block.where()}: the {block.language} block exited with {done.returncode}:\n{tail}",
                    pytrace=False)


@pytest.fixture
def clone_after_demo(tmp_path):
    """A folder holding what the blocks may use of a fresh clone after `make demo`, and the environment."""
    from tmanet.training.synthetic import ClipSpec, make_street_clip
    # the core package itself, as in the repository root: a bare tmanet/data/ folder would shadow it
    (tmp_path / "tmanet").symlink_to(ROOT / "tmanet", target_is_directory=True)
    (tmp_path / "demo_out").mkdir()
    frames, _ = make_street_clip(ClipSpec(frames=6, height=96, width=192, degradation=0.5, seed=2026))
    np.save(tmp_path / "demo_out" / "clip.npy", frames)
    bin_dir = Path(sys.executable).parent
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               MPLBACKEND="Agg")
    return tmp_path, env


PAGES_WITH_RUNNABLE = [p for p in PAGES if any(b.runnable for b in code_blocks(p))]


@pytest.mark.parametrize("page", PAGES_WITH_RUNNABLE, ids=lambda p: p.name)
def test_runnable_blocks_run(page, clone_after_demo):
    folder, env = clone_after_demo
    for block in code_blocks(page):
        if block.runnable:
            check_block(block, folder, env)
    if page.name == "README.md":  # what the Quick start says it writes
        for path in ["exports/demo/manifest.json", "exports/demo_int8/manifest.json", "overlay.mp4",
                     "masks/000000.png", "r50.pth", "runs/tiny/model.pth",
                     "exports/tiny/manifest.json"]:
            assert (folder / path).is_file(), f"README's blocks ran but wrote no {path}"
        assert len(list((folder / "masks").glob("*.png"))) == len(np.load(folder / "demo_out" / "clip.npy"))


def test_the_readme_marks_its_quick_start_and_python_api_runnable():
    readme = code_blocks(ROOT / "README.md")
    assert any(b.runnable and b.language == "bash" and "tmanet calibrate" in b.code for b in readme)
    assert any(b.runnable and b.language == "python" and "StreamingSegmenter.open" in b.code for b in readme)


def test_every_block_is_runnable_or_says_why_not():
    silent = [b.where() for p in PAGES for b in code_blocks(p)
              if not b.runnable and not b.code.lstrip().startswith(NOT_RUN)]
    assert not silent, (f"mark these blocks runnable, or start them with '{NOT_RUN} <reason>': "
                        + ", ".join(silent))


def test_every_size_reduction_still_applies():
    runnable = "".join(b.code for p in PAGES for b in code_blocks(p) if b.runnable)
    stale = [written for written, _ in SMALLER if written not in runnable]
    assert not stale, f"SMALLER lists sizes no runnable block uses any more: {stale}"


def test_a_failing_block_fails_the_test(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```bash runnable\necho ok\nfalse\necho never\n```\n\n```python runnable\n"
                    "raise SystemExit(3)\n```\n\n```bash\n# not run by tests/test_docs.py: a reason\n```\n")
    blocks = code_blocks(page)
    assert [(b.language, b.runnable, b.line) for b in blocks] == [("bash", True, 3), ("python", True, 9),
                                                                   ("bash", False, 13)]
    env = dict(os.environ)
    bash = run_block(blocks[0], tmp_path, env)
    assert bash.returncode == 1 and bash.stdout == "ok\n"  # -e: stops at the first failing command
    assert run_block(blocks[1], tmp_path, env).returncode == 3
    with pytest.raises(pytest.fail.Exception, match=r"page.md:3: the bash block exited with 1"):
        check_block(blocks[0], tmp_path, env)
