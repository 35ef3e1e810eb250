"""The math core must import (and work) with `transformers` unavailable."""

import subprocess
import sys
import textwrap


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
