"""EquivCNP (Kawano et al., ICLR 2021) with its own Lie groups and LieConv, plus CNP / ConvCNP baselines.

Every other file in this folder imports only torch, transformers and same-folder files: they are the Hub remote code
that `hf_koopman.models.publishing.save_for_hub` / `export_for_hub` add to an exported folder. `register()` (called by
`import hf_koopman`) registers the configs and models with the Auto classes.
"""

from __future__ import annotations

from .configuration_equivcnp import CNPConfig, ConvCNPConfig, EquivCNPConfig
from .groups import GROUPS, LieGroup, get_group
from .lieconv import LieConv, build_neighbourhood
from .modeling_cnp import CNPModel
from .modeling_convcnp import ConvCNPModel
from .modeling_equivcnp import EquivCNPModel, EquivCNPPreTrainedModel
from .neural_process import NeuralProcessCollator, NeuralProcessOutput, gaussian_log_likelihood

__all__ = [
    "EquivCNPConfig",
    "EquivCNPModel",
    "EquivCNPPreTrainedModel",
    "CNPConfig",
    "CNPModel",
    "ConvCNPConfig",
    "ConvCNPModel",
    "NeuralProcessCollator",
    "NeuralProcessOutput",
    "gaussian_log_likelihood",
    "LieGroup",
    "GROUPS",
    "get_group",
    "LieConv",
    "build_neighbourhood",
    "register",
    "AUTO_MAPS",
]

# complete auto_map per published model (config + base model), for `hf_koopman.models.publishing.save_for_hub`
AUTO_MAPS = {
    "equivcnp": {"AutoConfig": "configuration_equivcnp.EquivCNPConfig", "AutoModel": "modeling_equivcnp.EquivCNPModel"},
    "cnp": {"AutoConfig": "configuration_equivcnp.CNPConfig", "AutoModel": "modeling_cnp.CNPModel"},
    "convcnp": {"AutoConfig": "configuration_equivcnp.ConvCNPConfig", "AutoModel": "modeling_convcnp.ConvCNPModel"},
}


def register() -> None:
    """Register the three configs/models with `AutoConfig` / `AutoModel` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    for config_cls, model_cls in (
        (EquivCNPConfig, EquivCNPModel), (CNPConfig, CNPModel), (ConvCNPConfig, ConvCNPModel)
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
