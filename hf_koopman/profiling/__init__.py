"""RKSP on any `transformers` model: block discovery, residual-stream hooks, `profile()` and the `SpectralProfile`.

Glue around the transformers-free math core `hf_koopman.koopman`:

* `find_residual_blocks(model)` -> the ordered residual blocks, found from what transformers itself knows;
* `ResidualStreamRecorder` -> hooks that collect subsampled snapshot pairs (X, Y) with O(L·N·d) memory;
* `profile(model, inputs)` -> `SpectralProfile` (per-layer features, aggregates, verdict, report, plots);
* `profile_streaming(...)` -> the same for models that do not fit in memory (one block at a time).
"""

from __future__ import annotations

from typing import Any

from hf_koopman.profiling.blocks import ResidualBlock, find_residual_blocks, unwrap_model
from hf_koopman.profiling.probes import default_num_samples, default_probe_inputs, synthetic_token_sequences
from hf_koopman.profiling.profiler import profile, profile_from_snapshots
from hf_koopman.profiling.recorder import ResidualStreamRecorder
from hf_koopman.profiling.spectral_profile import SpectralProfile
from hf_koopman.profiling.weights import weights_origin
from hf_koopman.risk import DecisionRule  # re-exported: the rule behind `SpectralProfile.verdict`


__all__ = [
    "DecisionRule",
    "ResidualBlock",
    "ResidualStreamRecorder",
    "SpectralProfile",
    "default_num_samples",
    "default_probe_inputs",
    "find_residual_blocks",
    "profile",
    "profile_from_snapshots",
    "profile_streaming",
    "synthetic_token_sequences",
    "unwrap_model",
    "weights_origin",
]


def __getattr__(name: str) -> Any:
    # streaming.py is a separate component; resolve it lazily so that a failure there never breaks `profile`
    if name == "profile_streaming":
        from hf_koopman.profiling.streaming import profile_streaming

        return profile_streaming
    raise AttributeError(f"module 'hf_koopman.profiling' has no attribute {name!r}")
