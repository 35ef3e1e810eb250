"""Import boundaries: the math core without `transformers`, the product without `research/`, `datasets` or `peft`."""

import subprocess
import sys
import textwrap
from pathlib import Path


def test_koopman_core_imports_without_transformers():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
        import torch
        import hf_koopman.koopman as K
        X = torch.randn(64, 4, dtype=torch.float64)
        res = K.whitened_dmd(X, X @ torch.diag(torch.tensor([0.5, 0.9, 1.0, 1.2], dtype=torch.float64)))
        feats = K.spectral_features(res)
        assert "transformers" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
        print("ok", feats.n_modes)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    # run from the repository root, where `research` is importable: what matters is that nothing imports it
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO_ROOT)


def test_hf_koopman_imports_nothing_from_research_and_registers_no_research_model():
    out = _run(
        """
        import sys
        import hf_koopman
        from hf_koopman import KSSTrainer, RKSPCallback, RiskEstimator, profile  # the public API, resolved
        from hf_koopman.models import equivcnp, reynet
        from transformers import CONFIG_MAPPING
        research = sorted(m for m in sys.modules if m == "research" or m.startswith("research."))
        assert not research, research
        assert "reynet" in CONFIG_MAPPING and "equivcnp" in CONFIG_MAPPING
        assert "rksp_gpt" not in CONFIG_MAPPING
        import research.rksp_gpt  # the research GPT registers itself when (and only when) it is imported
        assert "rksp_gpt" in CONFIG_MAPPING
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_product_works_without_datasets_and_peft():
    out = _run(
        """
        import sys
        sys.modules["datasets"] = None  # `import datasets` / `import peft` now raise ImportError
        sys.modules["peft"] = None
        import torch
        import hf_koopman
        from hf_koopman import RKSPCallback, KSSTrainer, profile
        from hf_koopman.cli import _load_dataset
        from hf_koopman.testing_utils import tiny_model, tiny_peft_model
        prof = profile(tiny_model("llama"), num_samples=128)
        assert prof.layers
        for call, extra in ((lambda: _load_dataset("some/dataset", "train"), "datasets"), (tiny_peft_model, "peft")):
            try:
                call()
            except ImportError as err:
                assert f"pip install 'hf-koopman[{extra}]'" in str(err), err
            else:
                raise AssertionError("no ImportError")
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_product_tests_do_not_import_research():
    """The library's tests stand on their own: only tests/research/ (and this file's boundary checks) use `research`."""
    import re

    pattern = re.compile(r"^\s*(from research[\s.]|import research\b)", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / "tests").rglob("*.py"))
        if "research" not in path.relative_to(REPO_ROOT / "tests").parts[:1] and path.name != Path(__file__).name
        and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders
