"""The documentation runs: every ```python block of README.md and docs/**/*.md executes, and the MkDocs site builds
with --strict.

The blocks of one Markdown file run in one fresh interpreter, each in its own namespace (a block must not rely on names
defined by an earlier one), offline, in a temporary working directory that holds a link to the repository's
`checkpoints/` so that examples can load the reference checkpoints by their relative path. Other fenced languages
(bash, text, ...) are not executed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

# Blocks that do not run yet: file -> {a string that identifies the block: the reason}. The test fails when such a
# block starts to run (remove its entry then) and when an entry matches no block.
KNOWN_BROKEN: dict[str, dict[str, str]] = {
    "README.md": {
        "train_dataset=ds": "the callback/KSS example uses `model` and `ds` defined nowhere (README rewrite pending)",
    },
}

# Runs in the child: execute each block in a fresh namespace, record which fail, print their tracebacks.
_RUNNER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
failed = []
for block in blocks:
    try:
        exec(compile(block["source"], block["name"], "exec"), {"__name__": "__main__"})
    except BaseException:  # noqa: BLE001 - SystemExit included: a block must not end the interpreter
        failed.append(block["name"])
        print(f"===== {block['name']} failed =====", file=sys.stderr)
        traceback.print_exc()
json.dump(failed, open(sys.argv[2], "w"))
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """`(line number, source)` of every ```python fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def run_python_blocks(path: Path, workdir: Path, *, timeout: float = 600) -> tuple[list[str], str]:
    """Run every ```python block of `path` (see the module docstring); returns the names (`file:line`) of the blocks
    that raised, and the child's stderr."""
    rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    blocks = [{"name": f"{rel}:{line}", "source": source} for line, source in python_blocks(path)]
    (workdir / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    link = workdir / "checkpoints"
    if not link.exists():
        link.symlink_to(REPO / "checkpoints", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(workdir / ".hf_home"), "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, "blocks.json", "failed.json"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not (workdir / "failed.json").is_file():
        raise RuntimeError(f"the block runner itself failed:\n{proc.stderr[-3000:]}")
    return json.loads((workdir / "failed.json").read_text()), proc.stderr


def _files_with_blocks() -> list[Path]:
    return [p for p in MARKDOWN if python_blocks(p)]


@pytest.mark.slow
@pytest.mark.parametrize("path", _files_with_blocks(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_python_blocks_run(path, tmp_path):
    rel = path.relative_to(REPO).as_posix()
    failed, stderr = run_python_blocks(path, tmp_path)
    expected = {f"{rel}:{line}" for line, source in python_blocks(path)
                if any(key in source for key in KNOWN_BROKEN.get(rel, {}))}
    unexpected, fixed = sorted(set(failed) - expected), sorted(expected - set(failed))
    assert not unexpected, f"blocks that fail: {unexpected}\n{stderr[-4000:]}"
    assert not fixed, f"blocks listed in KNOWN_BROKEN now run: {fixed}; remove their entries"


def test_known_broken_entries_match_a_block():
    for rel, entries in KNOWN_BROKEN.items():
        sources = [source for _, source in python_blocks(REPO / rel)]
        for key in entries:
            assert any(key in s for s in sources), f"KNOWN_BROKEN[{rel!r}][{key!r}] matches no block; remove it"


def test_block_runner_reports_failures(tmp_path):
    """The runner isolates blocks: a name from an earlier block is not visible, and a failing block is reported."""
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\ntext\n\n```python\nprint(x)\n```\n\n```bash\nexit 1\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    failed, stderr = run_python_blocks(page, work, timeout=120)
    assert failed == ["page.md:7"] and "NameError" in stderr


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="install the docs extra: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for page in ("index.html", "quickstart/index.html", "api/koopman/index.html", "api/models/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "publishing" / "index.html").read_text(encoding="utf-8")
    assert "export_for_hub" in api and "save_for_hub" in api
