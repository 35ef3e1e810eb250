"""The public facade: every name in `hf_koopman.__all__` resolves, and importing registers our Auto classes."""

import importlib

import pytest

import hf_koopman


@pytest.mark.parametrize("name", [n for n in hf_koopman.__all__ if n != "__version__"])
def test_public_name_resolves(name):
    obj = getattr(hf_koopman, name)
    home = hf_koopman._LAZY[name]  # the name comes from the module the facade says defines it
    assert obj is getattr(importlib.import_module(home), name)


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        hf_koopman.not_a_public_name  # noqa: B018


def test_auto_classes_registered_on_import():
    from transformers import AutoConfig

    for model_type in ("reynet", "equivcnp"):
        assert AutoConfig.for_model(model_type).model_type == model_type
