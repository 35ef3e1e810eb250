"""ReyNet: invariant and equivariant Reynolds networks (Sannai, Kawano, Kumagai, JMLR 2024) for sets and graphs.

Public API:

* operators: [`full_reynolds`] / [`reductive_reynolds`] (rank 2, pair functions on 2×2 blocks),
  [`full_reynolds_set`] / [`reductive_reynolds_set`] (rank 1, cyclic-shift design), [`full_reynolds_k`] /
  [`reductive_reynolds_k`] (order-k injective-tuple design) and the designs themselves;
* models: [`ReyNetConfig`], [`ReyNetModel`], [`ReyNetForGraphClassification`], [`ReyNetForEquivariantRegression`],
  [`ReyNetForInvariantRegression`]; [`IEGNLinear`] is the Maron et al. baseline layer;
* data: [`build_graph_tensor`] (edge list / adjacency + node labels or features -> the `(C, n, n)` graph tensor) and
  [`ReyNetGraphCollator`] (pads graphs of different sizes into `graph_tensor` + `node_mask` for `Trainer`).

Every other file in this folder imports only torch / transformers / same-folder files: they are the Hub remote code
that `hf_koopman.models.publishing.save_for_hub` / `export_for_hub` add to an exported folder; this `__init__` (not
exported) registers the classes with the Auto classes.
"""

from __future__ import annotations

from .configuration_reynet import ReyNetConfig
from .graph_data import ReyNetGraphCollator, build_graph_tensor
from .iegn import IEGNLinear
from .modeling_reynet import (
    ReyNetEquivariantOutput,
    ReyNetForEquivariantRegression,
    ReyNetForGraphClassification,
    ReyNetForInvariantRegression,
    ReyNetInvariantOutput,
    ReyNetModel,
    ReyNetModelOutput,
    ReyNetPreTrainedModel,
)
from .reynolds import (
    all_permutations,
    full_reynolds,
    full_reynolds_k,
    full_reynolds_set,
    graph_design,
    injective_tuple_design,
    pair_blocks,
    reductive_reynolds,
    reductive_reynolds_k,
    reductive_reynolds_set,
    set_design,
)


__all__ = [
    "ReyNetConfig",
    "ReyNetPreTrainedModel",
    "ReyNetModel",
    "ReyNetForGraphClassification",
    "ReyNetForEquivariantRegression",
    "ReyNetForInvariantRegression",
    "ReyNetModelOutput",
    "ReyNetInvariantOutput",
    "ReyNetEquivariantOutput",
    "IEGNLinear",
    "ReyNetGraphCollator",
    "build_graph_tensor",
    "full_reynolds",
    "reductive_reynolds",
    "full_reynolds_set",
    "reductive_reynolds_set",
    "full_reynolds_k",
    "reductive_reynolds_k",
    "all_permutations",
    "set_design",
    "graph_design",
    "injective_tuple_design",
    "pair_blocks",
    "AUTO_MAP",
    "register",
]

# Complete auto_map for Hub remote code (base + every head); used by `hf_koopman.models.publishing`. transformers
# reads the keys that name its own Auto classes; the other three name the heads for remote-code readers.
AUTO_MAP = {
    "AutoConfig": "configuration_reynet.ReyNetConfig",
    "AutoModel": "modeling_reynet.ReyNetModel",
    "AutoModelForSequenceClassification": "modeling_reynet.ReyNetForGraphClassification",
    "AutoModelForGraphClassification": "modeling_reynet.ReyNetForGraphClassification",
    "AutoModelForEquivariantRegression": "modeling_reynet.ReyNetForEquivariantRegression",
    "AutoModelForInvariantRegression": "modeling_reynet.ReyNetForInvariantRegression",
}


def register() -> None:
    """Register ReyNet with `AutoConfig`, `AutoModel` and `AutoModelForSequenceClassification` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    AutoConfig.register(ReyNetConfig.model_type, ReyNetConfig, exist_ok=True)
    AutoModel.register(ReyNetConfig, ReyNetModel, exist_ok=True)
    # transformers has no graph-classification Auto class; sequence classification is the closest existing one
    AutoModelForSequenceClassification.register(ReyNetConfig, ReyNetForGraphClassification, exist_ok=True)
