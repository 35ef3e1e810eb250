"""Residual-block discovery on tiny models of every family, overrides, wrappers and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_koopman.profiling import ResidualBlock, find_residual_blocks, unwrap_model
from hf_koopman.testing_utils import TINY_ARCHITECTURES, tiny_model, tiny_peft_model

DECODER_ONLY = ["gpt2", "llama", "mistral", "mixtral", "qwen2_moe", "mamba", "mamba2"]
BLOCK_CLASS = {
    "gpt2": "GPT2Block", "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer",
    "mixtral": "MixtralDecoderLayer", "qwen2_moe": "Qwen2MoeDecoderLayer", "mamba": "MambaBlock",
    "mamba2": "Mamba2Block", "bert": "BertLayer", "vit": "ViTLayer", "t5": "T5Block",
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "mixtral", "qwen2_moe", "mamba", "mamba2", "bert", "vit"])
def test_blocks_found_equal_num_layers(arch):
    model = tiny_model(arch, num_hidden_layers=3)
    blocks = find_residual_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 3
    assert all(isinstance(b, ResidualBlock) for b in blocks)
    assert {type(b.module).__name__ for b in blocks} == {BLOCK_CLASS[arch]}
    assert {b.stack for b in blocks} == {""}
    modules = dict(unwrap_model(model).named_modules())
    assert all(modules[b.name] is b.module for b in blocks)  # names are real dotted paths
    assert [b.name.rsplit(".", 1)[-1] for b in blocks] == ["0", "1", "2"]  # execution order


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_profiles_both_stacks_labelled(arch):
    model = tiny_model(arch)
    blocks = find_residual_blocks(model)
    assert [b.stack for b in blocks] == ["encoder", "encoder", "decoder", "decoder"]
    assert all(b.name.startswith(b.stack) for b in blocks)


def test_peft_lora_llama_is_unwrapped():
    peft_model = tiny_peft_model("llama")
    blocks = find_residual_blocks(peft_model)
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert blocks[0].module is peft_model.get_base_model().model.layers[0]


def test_paths_copied_from_a_peft_model_name_the_wrapped_blocks():
    """`layers=` paths as the PEFT model's own `named_modules()` prints them (adapters: `base_model.model.`, prompt
    learning: `base_model.`) resolve on the model it wraps, as the unwrapped paths do."""
    import peft

    lora = tiny_peft_model("gpt2")
    assert "base_model.model.transformer.h" in dict(lora.named_modules())
    expected = [b.module for b in find_residual_blocks(lora)]
    for path in ("base_model.model.transformer.h", ["base_model.model.transformer.h.0",
                                                     "base_model.model.transformer.h.1"], "transformer.h"):
        assert [b.module for b in find_residual_blocks(lora, layers=path)] == expected, path
    prompt = peft.get_peft_model(tiny_model("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    assert "base_model.transformer.h" in dict(prompt.named_modules())
    assert [b.module for b in find_residual_blocks(prompt, layers="base_model.transformer.h")] == list(
        prompt.get_base_model().transformer.h)
    # a model with a sub-module of its own called base_model: its paths are taken as written
    pair = nn.Module()
    pair.base_model, pair.model = tiny_model("llama").model, tiny_model("llama", seed=1).model
    with pytest.raises(ValueError, match="not a sub-module"):
        find_residual_blocks(pair, layers="base_model.model.layers")


def test_paths_of_the_base_model_and_of_the_task_model_resolve_on_both():
    """`h` (GPT2Model's list) names the blocks of a GPT2LMHeadModel, and `transformer.h` those of a GPT2Model: the CLI
    profiles the base model and `--stream` the task model, with the same --layers."""
    task = tiny_model("gpt2")
    base = task.transformer
    for model in (task, base):
        for path in ("h", "transformer.h"):
            assert [b.module for b in find_residual_blocks(model, layers=path)] == list(base.h), (type(model), path)


def test_data_parallel_wrapper_is_unwrapped():
    model = tiny_model("gpt2")
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    assert [b.module for b in find_residual_blocks(wrapped)] == list(model.transformer.h)


def test_override_by_path_and_by_modules():
    model = tiny_model("llama")
    by_path = find_residual_blocks(model, layers="model.layers")
    by_modules = find_residual_blocks(model, layers=list(model.model.layers))
    by_names = find_residual_blocks(model, layers=["model.layers.1"])
    assert [b.name for b in by_path] == [b.name for b in by_modules] == ["model.layers.0", "model.layers.1"]
    assert [b.name for b in by_names] == ["model.layers.1"]


def test_override_path_of_the_task_model_resolves_on_its_base_model():
    base = tiny_model("llama", head=False)  # LlamaModel: what the CLI profiles
    by_task_path = find_residual_blocks(base, layers="model.layers")
    assert [b.module for b in by_task_path] == list(base.layers)
    assert [b.name for b in find_residual_blocks(base, layers=["model.layers.1"])] == ["layers.1"]
    gpt2 = tiny_model("gpt2", head=False)
    assert [b.module for b in find_residual_blocks(gpt2, layers="transformer.h")] == list(gpt2.h)
    with pytest.raises(ValueError, match="not a sub-module"):  # only the base-model prefix is dropped
        find_residual_blocks(base, layers="decoder.layers")


def test_bad_override_raises_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layers='model\.blocks' is not a sub-module.*model\.layers"):
        find_residual_blocks(model, layers="model.blocks")
    with pytest.raises(ValueError, match="not a sub-module"):
        find_residual_blocks(model, layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="empty list"):
        find_residual_blocks(model, layers=[])
    with pytest.raises(TypeError, match="list"):
        find_residual_blocks(model, layers=model.model.layers[0])


class _Opaque(nn.Module):
    """No ModuleList, no transformers metadata: the structure cannot be guessed."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])

    def forward(self, x):
        return self.second(self.first(x))


def test_unknown_structure_lists_candidates_and_override():
    with pytest.raises(ValueError) as info:
        find_residual_blocks(_Opaque())
    message = str(info.value)
    assert "Candidates: 'heads' (2 x Linear)" in message
    # a list of torch layers holds no blocks: no path is suggested that would profile single Linear layers
    assert "None of them holds blocks" in message and "layers='heads'" not in message
    assert "skip connection written in the model's own forward()" in message


class _ResidualMLP(nn.Module):
    """A user's model: embedding, one residual MLP (the skip connection in this forward), a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 64)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.out(h + self.mlp(h))


def test_an_identity_standing_for_a_pruned_block_is_accepted_only_among_blocks():
    model = _TwoLists()
    model.trunk[1] = nn.Identity()
    assert [b.name for b in find_residual_blocks(model, layers="trunk")] == ["trunk.0", "trunk.1", "trunk.2"]
    with pytest.raises(ValueError, match=r"\(Identity\), not residual blocks"):  # alone: e.g. a drop_path at rate 0
        find_residual_blocks(model, layers="trunk.1")


def test_single_torch_layers_are_refused_as_blocks():
    # the Linear -> GELU -> Linear inside one MLP are not residual blocks: their spectrum is not RKSP's, so neither
    # auto-discovery's suggestion nor an explicit layers= makes them blocks
    model = _ResidualMLP()
    with pytest.raises(ValueError) as info:
        find_residual_blocks(model)
    assert "layers='mlp'" not in str(info.value) and "None of them holds blocks" in str(info.value)
    for layers in ("mlp", ["mlp.0", "mlp.2"], [model.mlp[1]]):
        with pytest.raises(ValueError, match=r"single torch layer\(s\) \((GELU/)?Linear|GELU\), not residual blocks"):
            find_residual_blocks(model, layers=layers)


class _TwoLists(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.ModuleList([_Block() for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(8, 8) for _ in range(5)])


def test_the_suggested_block_list_holds_blocks_not_the_longest_list_of_layers():
    with pytest.raises(ValueError) as info:
        find_residual_blocks(_TwoLists())
    message = str(info.value)
    assert "profile(model, layers='trunk')" in message and "--layers trunk`" in message
    assert [b.name for b in find_residual_blocks(_TwoLists(), layers="trunk")] == ["trunk.0", "trunk.1", "trunk.2"]


class _Config:
    num_hidden_layers = 3


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x)


class _CustomDeep(nn.Module):
    """Plain torch model with a config: found by the num_hidden_layers fallback."""

    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.stem = nn.Linear(8, 8)
        self.trunk = nn.ModuleList([_Block() for _ in range(3)])
        self.aux = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        x = self.stem(x)
        for block in self.trunk:
            x = block(x)
        return x


def test_num_hidden_layers_fallback():
    blocks = find_residual_blocks(_CustomDeep())
    assert [b.name for b in blocks] == ["trunk.0", "trunk.1", "trunk.2"]


def test_tiny_architectures_cover_the_issue_families():
    assert set(DECODER_ONLY + ["bert", "vit", "t5"]) <= set(TINY_ARCHITECTURES)
    assert torch.is_tensor(next(tiny_model("bert").parameters()))


def test_blocks_named_only_by_the_models_recorded_hidden_states_are_found():
    from transformers import PreTrainedConfig, PreTrainedModel

    class Block(nn.Module):  # neither a GradientCheckpointingLayer nor in _no_split_modules
        def __init__(self, width):
            super().__init__()
            self.mlp = nn.Linear(width, width)

        def forward(self, hidden):
            return hidden + self.mlp(hidden)

    class Toy(PreTrainedModel):
        config_class = PreTrainedConfig
        _can_record_outputs = {"hidden_states": Block}

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(16, 8)
            self.blocks = nn.ModuleList(Block(8) for _ in range(3))
            self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))  # another list, as long as num_hidden_layers

    model = Toy(PreTrainedConfig(num_hidden_layers=2))
    assert [b.name for b in find_residual_blocks(model)] == ["blocks.0", "blocks.1", "blocks.2"]
