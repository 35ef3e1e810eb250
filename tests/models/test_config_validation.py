"""Config validation of EquivCNP / CNP / ConvCNP and ReyNet: every field is checked in `validate()`, which runs in the
config's `__init__`, in the models' `__init__` (so `from_pretrained(path, **overrides)`, which sets the overrides with
`setattr` after `__init__`, and hand edits are checked too) and in `save_pretrained`; and ReyNet refuses an input whose
dtype differs from its weights, naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import hf_koopman  # noqa: F401  (registers the Auto classes)
from hf_koopman.models.equivcnp import CNPConfig, CNPModel, ConvCNPConfig, ConvCNPModel, EquivCNPConfig, EquivCNPModel
from hf_koopman.models.reynet import (
    ReyNetConfig,
    ReyNetForGraphClassification,
    ReyNetForInvariantRegression,
    ReyNetGraphCollator,
    ReyNetModel,
)

CHECKPOINTS = sorted(p for p in (Path(__file__).resolve().parents[2] / "checkpoints").iterdir() if p.is_dir())
TINY_EQUIVCNP = dict(hidden_size=8, num_layers=1, kernel_channels=4, kernel_hidden=8)
TINY_REYNET = dict(in_channels=2, num_labels=2, phi_hidden_sizes=[4], channel_hidden_sizes=[4], head_hidden_sizes=[4])


# ----------------------------------------------------------------------------------------------------------------------
# EquivCNP / CNP / ConvCNP
# ----------------------------------------------------------------------------------------------------------------------
BAD_NP_CONFIGS = [
    (EquivCNPConfig, dict(num_neighbours=0), r"num_neighbours must be a positive int, got 0"),
    (EquivCNPConfig, dict(num_neighbours=-1), r"num_neighbours must be a positive int, got -1"),
    (EquivCNPConfig, dict(encoder_neighbours="64"), r"encoder_neighbours must be a positive int, got '64'; .*string"),
    (EquivCNPConfig, dict(hidden_size=True), r"hidden_size must be a positive int, got True"),
    (EquivCNPConfig, dict(y_dim=2.0), r"y_dim must be a positive int, got 2.0"),
    (EquivCNPConfig, dict(radius=-0.25), r"radius must be a positive finite number .*got -0.25"),
    (EquivCNPConfig, dict(radius=float("inf")), r"radius must be a positive finite number .*got inf"),
    (EquivCNPConfig, dict(min_std=-1.0), r"min_std must be a positive finite number .*got -1.0"),
    (EquivCNPConfig, dict(pair_scale=0), r"pair_scale must be a positive finite number .*got 0"),
    (EquivCNPConfig, dict(alpha="0.3"), r"alpha must be a number in \(0, 1\] .*got '0.3'; .*string"),
    (EquivCNPConfig, dict(alpha=0), r"alpha must be a number in \(0, 1\] .*got 0"),
    (EquivCNPConfig, dict(x_dim="1"), r"x_dim must be 1, got '1'"),
    (EquivCNPConfig, dict(group="SO2", x_dim=1), r"group 'SO2' acts on R\^2, so x_dim must be 2, got 1"),
    (EquivCNPConfig, dict(group=["T1"]), r"group must be one of .*got \['T1'\]"),
    (EquivCNPConfig, dict(grid_margin=-5.0), r"grid_margin must be a non-negative finite number .*got -5.0"),
    (EquivCNPConfig, dict(grid_margin="a"), r"grid_margin must be a non-negative finite number .*got 'a'"),
    (EquivCNPConfig, dict(discretisation="pixels"), r"discretisation must be one of .*got 'pixels'"),
    (CNPConfig, dict(hidden_size=0), r"CNPConfig: hidden_size must be a positive int, got 0"),
    (CNPConfig, dict(min_std=2), r"CNPConfig: min_std must be < 1 .*got 2"),
    (CNPConfig, dict(min_std="0.1"), r"CNPConfig: min_std must be a positive finite number .*got '0.1'"),
    (ConvCNPConfig, dict(channels=8), r"channels must be a list of positive ints .*got 8; pass e.g. channels=\[8\]"),
    (ConvCNPConfig, dict(channels=[8, 0]), r"channels must be a list of positive ints .*got \[8, 0\]"),
    (ConvCNPConfig, dict(channels=[]), r"channels must list at least one Conv1d width"),
    (ConvCNPConfig, dict(kernel_size=4), r"kernel_size must be odd .*got 4; use e.g. 5"),
    (ConvCNPConfig, dict(x_dim="1"), r"x_dim must be 1, got '1'"),
    (ConvCNPConfig, dict(grid_margin=-5.0), r"ConvCNPConfig: grid_margin must be a non-negative finite number"),
]
NP_IDS = [f"{cls.__name__}-{kwargs}" for cls, kwargs, _ in BAD_NP_CONFIGS]


@pytest.mark.parametrize("cls, kwargs, match", BAD_NP_CONFIGS, ids=NP_IDS)
def test_neural_process_configs_refuse_bad_values_naming_them(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls, kwargs, match", BAD_NP_CONFIGS, ids=NP_IDS)
def test_neural_process_models_refuse_a_config_changed_after_construction(cls, kwargs, match):
    """`validate()` holds every check: a field set after `__init__` (as `from_pretrained` overrides are) is refused
    when a model is built from the config, with the message `__init__` gives."""
    model_cls = {EquivCNPConfig: EquivCNPModel, CNPConfig: CNPModel, ConvCNPConfig: ConvCNPModel}[cls]
    config = cls(**(TINY_EQUIVCNP if cls is EquivCNPConfig else {}))
    for key, value in kwargs.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=match):
        model_cls(config)


def test_numbers_are_accepted_as_ints_and_stored_as_floats():
    config = EquivCNPConfig(radius=1, alpha=1, grid_margin=0, min_std=1, points_per_unit=16)
    assert (config.radius, config.alpha, config.grid_margin, config.pair_scale) == (1.0, 1.0, 0.0, 1.0)
    assert all(isinstance(getattr(config, k), float) for k in ("radius", "alpha", "grid_margin", "pair_scale"))
    assert ConvCNPConfig(channels=(4, 8)).channels == [4, 8]  # a list, as JSON reloads it


def test_zero_grid_margin_runs():
    torch.manual_seed(0)
    x = torch.rand(1, 6, 1)
    for model in (EquivCNPModel(EquivCNPConfig(grid_margin=0, **TINY_EQUIVCNP)),
                  ConvCNPModel(ConvCNPConfig(channels=[4], grid_margin=0))):
        out = model.eval()(x, torch.sin(x), torch.rand(1, 5, 1))
        assert torch.isfinite(out.mean).all()


@pytest.fixture(scope="module")
def tiny_equivcnp(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("equivcnp")
    torch.manual_seed(0)
    EquivCNPModel(EquivCNPConfig(**TINY_EQUIVCNP)).save_pretrained(path)
    return path


@pytest.mark.parametrize("override, match", [
    (dict(num_neighbours=-1), r"num_neighbours must be a positive int, got -1"),
    (dict(num_neighbours=0), r"num_neighbours must be a positive int, got 0"),
    (dict(encoder_neighbours="64"), r"encoder_neighbours must be a positive int, got '64'"),
    (dict(radius=-0.25), r"radius must be a positive finite number"),
    (dict(min_std=-1.0), r"min_std must be a positive finite number"),
    (dict(grid_margin=-5.0), r"grid_margin must be a non-negative finite number"),
])
def test_from_pretrained_overrides_are_validated(tiny_equivcnp, override, match):
    with pytest.raises(ValueError, match=match):
        AutoModel.from_pretrained(tiny_equivcnp, **override)


def test_documented_neighbour_override_still_loads(tiny_equivcnp):
    """docs/guides/models.md: `AutoModel.from_pretrained(path, num_neighbours=64, encoder_neighbours=64)`."""
    model = AutoModel.from_pretrained(tiny_equivcnp, num_neighbours=64, encoder_neighbours=64)
    assert isinstance(model, EquivCNPModel)
    assert (model.config.num_neighbours, model.config.encoder_neighbours) == (64, 64)


def test_save_pretrained_refuses_an_invalid_config(tmp_path):
    config = ConvCNPConfig()
    config.grid_margin = -1.0
    with pytest.raises(ValueError, match="grid_margin must be a non-negative finite number"):
        config.save_pretrained(tmp_path)


@pytest.mark.parametrize("folder", CHECKPOINTS, ids=lambda p: p.name)
def test_shipped_checkpoint_configs_validate(folder):
    AutoConfig.from_pretrained(folder).validate()


# ----------------------------------------------------------------------------------------------------------------------
# ReyNet
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_labels", [0, -2, "2", 1.0])
def test_reynet_num_labels_must_be_at_least_one(num_labels):
    """-2 would otherwise become `id2label = {}` silently: a zero-width classifier."""
    with pytest.raises(ValueError, match=rf"num_labels must be an integer >= 1 .*got {num_labels!r}"):
        ReyNetConfig(num_labels=num_labels)


def test_reynet_num_labels_set_after_construction_is_refused_at_build():
    config = ReyNetConfig(**TINY_REYNET)
    config.num_labels = 0
    with pytest.raises(ValueError, match=r"num_labels must be an integer >= 1 .*got 0"):
        ReyNetForGraphClassification(config)


@pytest.mark.parametrize("model_cls", [ReyNetModel, ReyNetForGraphClassification, ReyNetForInvariantRegression])
@pytest.mark.parametrize("field, value, match", [
    ("pooling", "max", r"pooling='max' is not one of \('sum', 'mean'\)"),
    ("hidden_act", "swish", r"hidden_act='swish' is not one of"),
    ("head_dropout", 2.0, r"head_dropout must be a float in \[0, 1\), got 2.0"),
    ("in_channels", 0, r"in_channels must be a positive integer, got 0"),
    ("phi_hidden_sizes", 8, r"phi_hidden_sizes must be a list of positive integers, got 8; .*\[8\]"),
    ("design_order", 4, r"design_order must be 2 \(ordered pairs\) or 3 \(triples\), got 4"),
])
def test_reynet_models_refuse_a_config_changed_after_construction(model_cls, field, value, match):
    config = ReyNetConfig(**TINY_REYNET)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        model_cls(config)


def test_reynet_iegn_needs_widths():
    with pytest.raises(ValueError, match=r"channel_hidden_sizes must not be empty with layer_type='iegn'"):
        ReyNetConfig(layer_type="iegn", channel_hidden_sizes=[])
    assert ReyNetConfig(phi_hidden_sizes=(4, 4)).phi_hidden_sizes == [4, 4]


@pytest.fixture(scope="module")
def tiny_reynet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reynet")
    torch.manual_seed(0)
    ReyNetForGraphClassification(ReyNetConfig(**TINY_REYNET)).save_pretrained(path)
    return path


@pytest.mark.parametrize("override, match", [
    (dict(pooling="max"), r"pooling='max' is not one of"),
    (dict(hidden_act="swish"), r"hidden_act='swish' is not one of"),
    (dict(head_dropout=2.0), r"head_dropout must be a float in \[0, 1\)"),
    (dict(in_channels=0), r"in_channels must be a positive integer, got 0"),
    (dict(num_labels=-2), r"num_labels must be an integer >= 1 .*got -2"),
])
def test_reynet_from_pretrained_overrides_are_validated(tiny_reynet, override, match):
    with pytest.raises(ValueError, match=match):
        AutoModelForSequenceClassification.from_pretrained(tiny_reynet, **override)


def test_reynet_valid_from_pretrained_override_loads(tiny_reynet):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reynet, pooling="mean")
    assert model.config.pooling == "mean" and model.reynet.pooler.mean


def test_reynet_input_dtype_other_than_the_weights_names_the_fix():
    torch.manual_seed(0)
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY_REYNET)).to(torch.bfloat16).eval()
    item = {"graph_tensor": torch.rand(2, 3, 3), "labels": 0}
    batch = ReyNetGraphCollator()([item])
    assert batch["graph_tensor"].dtype == torch.float32
    with pytest.raises(TypeError, match=r"graph_tensor is torch.float32 but the model's weights are torch.bfloat16; "
                                        r"cast the input with .to\(torch.bfloat16\) \(for ReyNetGraphCollator: "
                                        r"dtype=torch.bfloat16\) or the model with model.to\(torch.float32\)"):
        model(**batch)
    out = model(**ReyNetGraphCollator(dtype=torch.bfloat16)([item]))  # the fix the message names
    assert out.logits.dtype == torch.bfloat16
