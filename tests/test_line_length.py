"""Every line of the package's Python files fits in 120 characters (the project's style; there is no linter run in CI,
so this test keeps it)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_koopman"
LIMIT = 120


def test_package_lines_fit_in_120_characters():
    long = [f"{path.relative_to(PACKAGE.parent)}:{number} ({len(line)})"
            for path in sorted(PACKAGE.rglob("*.py"))
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if len(line) > LIMIT]
    assert not long, f"lines over {LIMIT} characters: {long}"
