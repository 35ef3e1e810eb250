"""The public facade: every name in `hf_koopman.__all__` resolves, and importing registers our Auto classes."""

import pytest

import hf_koopman


@pytest.mark.parametrize("name", [n for n in hf_koopman.__all__ if n != "__version__"])
def test_public_name_resolves(name):
    assert getattr(hf_koopman, name) is not None


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        hf_koopman.not_a_public_name  # noqa: B018


def test_auto_classes_registered_on_import():
    from transformers import AutoConfig

    for model_type in ("reynet", "equivcnp"):
        assert AutoConfig.for_model(model_type).model_type == model_type
