"""profile() inputs a user gets wrong: each either works as the user meant or fails with a message naming the fix."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from hf_koopman.profiling import SpectralProfile, profile
from hf_koopman.profiling.inputs import _check_token_ids, iter_batches
from hf_koopman.testing_utils import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:N=.*rank-limited:UserWarning")  # tiny token counts by design

WORDS = ["[UNK]", "<eos>", "hello", "world", "koopman", "operator", "residual", "stream", "token", "state"]


def _tokenizer(**kwargs):
    """In-memory word-level tokenizer (no Hub); like GPT-2's, it has an EOS but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]", **kwargs)


TEXTS = ["hello world koopman operator residual stream", "token state", "koopman residual stream token"]


# 1. a tokenizer called without return_tensors="pt": lists of ids
def test_tokenizer_lists_are_padded_into_tensors_with_a_mask():
    encoded = _tokenizer()(TEXTS)
    assert isinstance(encoded["input_ids"][0], list)
    (batch,) = iter_batches(encoded, model=tiny_model("llama"))
    assert batch["input_ids"].shape == (3, 6) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [6, 2, 4]
    assert batch["input_ids"][1].tolist() == [8, 9, 0, 0, 0, 0]
    result = profile(tiny_model("llama"), inputs=encoded, num_samples=64, rank=4)
    assert result.meta["tokens_seen"] == 12  # the padding is masked out


def test_tokenizer_list_of_one_text_is_one_sequence():
    (batch,) = iter_batches(_tokenizer()(TEXTS[0]), model=tiny_model("llama"))
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5, 6, 7]] and batch["attention_mask"].tolist() == [[1] * 6]


# 2. a 1-D tensor of token ids
def test_1d_token_ids_are_profiled_as_one_sequence(caplog):
    from transformers.utils import logging as hf_logging

    ids = torch.arange(100) % 128
    before = hf_logging.get_verbosity()
    try:  # hf_koopman's info records follow the transformers verbosity
        hf_logging.set_verbosity_info()
        with caplog.at_level(logging.INFO, logger="hf_koopman"):
            result = profile(tiny_model("llama"), inputs=ids, num_samples=64, rank=4)
    finally:
        hf_logging.set_verbosity(before)
    assert result.meta["tokens_seen"] == 100
    assert "1-D tensor of 100 token ids: profiling it as one sequence" in caplog.text
    (batch,) = iter_batches({"input_ids": ids, "attention_mask": torch.ones(100)}, model=tiny_model("llama"))
    assert batch["input_ids"].shape == (1, 100) and batch["attention_mask"].shape == (1, 100)


# 3. ids from another tokenizer
def test_token_ids_beyond_the_vocabulary_name_the_tokenizer_mismatch():
    ids = torch.randint(0, 128, (2, 20))
    ids[1, 3] = 30521
    with pytest.raises(ValueError) as err:
        profile(tiny_model("llama"), inputs=ids, num_samples=16, rank=4)
    message = str(err.value)
    assert "token id 30521" in message and "vocabulary of 128 tokens (ids 0..127)" in message
    assert "the tokenizer does not match the model" in message and "AutoTokenizer.from_pretrained" in message


def test_multimodal_placeholder_ids_outside_the_vocabulary_are_allowed():
    model = tiny_model("llama")
    model.config.image_token_id = 500  # swapped out by a multimodal model before its embedding
    _check_token_ids(torch.tensor([[1, 500, 2]]), model)
    with pytest.raises(ValueError, match="token id 501"):
        _check_token_ids(torch.tensor([[1, 500, 501]]), model)


# 4. floats where token ids belong
def test_float_tensor_for_a_token_model_names_the_fix():
    with pytest.raises(ValueError) as err:
        profile(tiny_model("llama"), inputs=torch.randn(2, 20), num_samples=16, rank=4)
    message = str(err.value)
    assert "takes integer token ids (input_ids), got a float32 tensor of shape (2, 20)" in message
    assert "tokenizer(texts, return_tensors='pt')" in message and "inputs_embeds" in message
    with pytest.raises(ValueError, match="got a float32 tensor of shape"):
        profile(tiny_model("gpt2"), inputs={"input_ids": torch.rand(2, 8)}, num_samples=16, rank=4)


def test_float_tensor_for_a_vision_model_is_its_pixel_input():
    result = profile(tiny_model("vit"), inputs=torch.randn(2, 3, 32, 32), num_samples=16, rank=4)
    assert result.meta["tokens_seen"] == 2 * 17  # 16 patches + CLS per image


# 5. a model id instead of a model
def test_model_id_string_names_how_to_load_it():
    with pytest.raises(TypeError) as err:
        profile("gpt2")
    message = str(err.value)
    assert "got the str 'gpt2'" in message
    assert "AutoModel.from_pretrained('gpt2')" in message and "AutoModel.from_config" in message
    assert "hf-koopman profile gpt2" in message


@pytest.mark.parametrize("tokenizer", ["gpt2", 3])
def test_tokenizer_that_is_not_one_names_how_to_load_it(tokenizer):
    # a Hub id as pipeline(tokenizer="gpt2") takes it, or anything else that cannot encode text: refused before the
    # forward pass, naming AutoTokenizer
    with pytest.raises(TypeError) as err:
        profile(tiny_model("gpt2"), ["a b c"] * 3, tokenizer=tokenizer, num_samples=16)
    message = str(err.value)
    assert "tokenizer must be a tokenizer" in message and "AutoTokenizer.from_pretrained(" in message
    assert "got the str 'gpt2'" in message if isinstance(tokenizer, str) else "got int" in message


# 6. a plain nn.Module (no main_input_name)
class _TanhResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.f(x))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_TanhResidual() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_plain_module_gets_the_tensor_positionally():
    model = _MLP()
    result = profile(model, inputs=torch.randn(4, 8, 16), layers=["blocks.0", "blocks.1", "blocks.2"], num_samples=16,
                     rank=4)
    assert result.names == ["blocks.0", "blocks.1", "blocks.2"] and result.meta["tokens_seen"] == 32


class _KeywordWrapper(nn.Module):
    """A user's wrapper around a transformers model: keyword inputs passed on, no `main_input_name` of its own."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


def test_a_keyword_wrapper_gets_the_tensor_by_keyword():
    wrapper = _KeywordWrapper(tiny_model("llama"))
    result = profile(wrapper, inputs=torch.randint(0, 100, (2, 16)), num_samples=32, rank=4)
    assert result.meta["tokens_seen"] == 32


class _DecoupledEmbedding(nn.Embedding):
    """An embedding with extra rows beyond `config.vocab_size` (IDEFICS' `num_additional_embeddings`)."""

    num_additional_embeddings = 2


def test_ids_in_a_decoupled_embeddings_extra_rows_are_accepted():
    model = tiny_model("llama")
    vocab = model.config.vocab_size
    model.set_input_embeddings(_DecoupledEmbedding(vocab + 2, model.config.hidden_size))
    model.get_input_embeddings().num_embeddings = vocab  # as IDEFICS counts it: the extra rows come on top
    _check_token_ids(torch.tensor([[1, vocab + 1]]), model)  # an extra row: fine
    with pytest.raises(ValueError, match=f"holds token id {vocab + 2}"):
        _check_token_ids(torch.tensor([[1, vocab + 2]]), model)


# 7. save() / from_json() with folders and files
@pytest.fixture(scope="module")
def tiny_profile() -> SpectralProfile:
    return profile(tiny_model("llama"), num_samples=32, rank=4, model_name="tiny-llama")


def test_from_json_reads_the_folder_save_wrote(tiny_profile, tmp_path):
    tiny_profile.save(tmp_path / "llama-tiny", plots=False)
    assert SpectralProfile.from_json(tmp_path / "llama-tiny").names == tiny_profile.names
    assert SpectralProfile.from_json(str(tmp_path / "llama-tiny")).model_name == "tiny-llama"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without a profile.json"):
        SpectralProfile.from_json(tmp_path / "empty")


def test_save_to_an_existing_file_says_save_takes_a_folder(tiny_profile, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(NotADirectoryError) as err:
        tiny_profile.save(notes, plots=False)
    message = str(err.value)
    assert "writes profile.json, report.md and the plots into a folder" in message and "is an existing file" in message
    assert f"save({str(tmp_path / 'notes')!r})" in message
    assert notes.read_text() == "keep me"


def test_save_to_a_json_file_name_says_save_takes_a_folder(tiny_profile, tmp_path):
    with pytest.raises(ValueError, match=r"names a JSON file; pass its folder.*to_json_file\("):
        tiny_profile.save(tmp_path / "profile.json", plots=False)
    assert not (tmp_path / "profile.json").exists()  # no folder named profile.json was made


# 8. the caller's tokenizer is left as it was
@pytest.mark.parametrize("side", ["right", "left"])
def test_text_inputs_leave_the_tokenizer_unchanged_and_pad_with_eos(side):
    tokenizer = _tokenizer(padding_side=side)
    assert tokenizer.pad_token is None
    (batch,) = iter_batches(TEXTS, model=tiny_model("llama"), tokenizer=tokenizer)
    assert tokenizer.pad_token is None
    reference = copy.deepcopy(tokenizer)  # what padding with pad_token = eos_token gives
    reference.pad_token = reference.eos_token
    expected = reference(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    result = profile(tiny_model("llama"), TEXTS, tokenizer=tokenizer, num_samples=64, rank=4)
    assert result.meta["tokens_seen"] == 12 and tokenizer.pad_token is None


def test_one_long_text_fills_several_sequences_instead_of_one():
    result = profile(tiny_model("llama"), inputs="the quick brown fox. " * 200, max_length=32, num_samples=128, rank=4)
    assert result.meta["tokens_seen"] >= 128  # truncated to one sequence it would be 32 tokens
    from hf_koopman.profiling.inputs import split_text

    assert split_text("ab" * 10, max_length=2) == ["abababab"] * 2 + ["abab"]
    assert split_text("   ", max_length=2) == []


def test_a_model_that_wants_its_labels_as_decoder_inputs_gets_the_fix_named():
    # BLIP's question answering builds its decoder inputs from `labels`; profile() leaves label keys out of the forward
    import transformers

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    config = transformers.BlipConfig(text_config=dict(**tower, vocab_size=100),
                                     vision_config=dict(**tower, image_size=32, patch_size=8))
    model = transformers.BlipForQuestionAnswering(config).eval()
    batch = {"input_ids": torch.randint(3, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32),
             "labels": torch.randint(3, 100, (2, 4))}
    with pytest.raises(ValueError) as info:
        profile(model, batch, num_samples=8, progress=False)
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "profile() leaves labels out of the forward" in text
    assert "batch['decoder_input_ids'] = batch['labels']" in text
    fixed = profile(model, {**batch, "decoder_input_ids": batch.pop("labels")}, num_samples=8, progress=False)
    assert fixed.layers


@pytest.mark.parametrize("inputs, message", [
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"holds no tokens \(shape \(2, 0\)\)"),
    (torch.zeros(0, dtype=torch.long), r"holds no tokens"),
    (torch.tensor(5), r"a single number \(a 0-d tensor\)"),
    ({"input_ids": torch.full((4, 32), -1)}, r"negative token id -1, .*pad_token_id and mark the padding"),
    ({"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")}, r"on the meta device"),
    ({"inputs_embeds": torch.randn(4, 64, 16)}, r"inputs_embeds has shape \(4, 64, 16\); .*\(batch, sequence, 32\)"),
    ({"inputs_embeds": torch.randn(4, 64)}, r"inputs_embeds has shape \(4, 64\)"),
])
def test_token_inputs_the_embedding_cannot_take_name_the_fix(inputs, message):
    with pytest.raises(ValueError, match=message):
        profile(tiny_model("llama"), inputs=inputs, num_samples=16, rank=4)


def test_sequences_longer_than_the_position_table_name_the_limit():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    with pytest.raises(ValueError, match=r"300 tokens per row, more than the 64 positions .*max_length=64"):
        profile(model, inputs=torch.randint(0, 100, (2, 300)), num_samples=16, rank=4)
    profile(model, inputs=torch.randint(0, 100, (2, 64)), num_samples=16, rank=4)  # at the limit it runs


def test_num_samples_beyond_the_free_memory_is_refused_before_any_work(monkeypatch):
    import psutil

    class Free:
        available = 2**20  # 1 MiB: 4096 states x 32 wide x 3 boundaries x 4 bytes = 1.5 MiB do not fit

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free)
    with pytest.raises(ValueError, match=r"num_samples=4096 token states of width 32 at 3 block boundaries take .* "
                                         r"more than the 0.0 GiB free here; pass a smaller num_samples \(at most 2730 fit\)"):
        profile(tiny_model("llama"), num_samples=4096, rank=4)
    # what will not be held is not counted: the user's 128 tokens, or a probe capped by max_tokens
    profile(tiny_model("llama"), torch.randint(0, 100, (2, 64)), num_samples=4096, rank=4)
    profile(tiny_model("llama"), num_samples=4096, max_tokens=64, rank=4)


def test_the_memory_check_counts_the_full_spectrums_analysis(monkeypatch):
    """The snapshots of 1000 token states fit in 1 MiB (0.37 MiB), but not with one batched analysis call of the full
    spectrum (two layers: 2 x (10 x 32^2 float64 + 2 x 1000 x 32 float32) = 0.64 MiB); the error says so and names the
    N that fits. The rank-r approximation needs no such working memory and runs."""
    import psutil

    class Free:
        available = 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free)
    with pytest.raises(ValueError, match=r"take 0.0 GiB as float32, and their analysis 0.0 GiB more, more than the "
                                         r"0.0 GiB free here; pass a smaller num_samples \(at most 987 fit\)"):
        profile(tiny_model("llama"), num_samples=1000)
    profile(tiny_model("llama"), num_samples=1000, rank=4)
    profile(tiny_model("llama"), num_samples=987)


def test_the_default_probe_stops_at_max_tokens():
    result = profile(tiny_model("llama"), num_samples=10**6, max_tokens=300, rank=4)  # not 10**6 synthetic tokens
    assert result.meta["tokens_seen"] < 1000


def test_an_attention_mask_of_another_length_is_refused_and_one_of_other_rows_is_not():
    ids = torch.randint(0, 100, (4, 32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 16\) but input_ids \(4, 32\): it covers 16"):
        profile(tiny_model("llama"), inputs={"input_ids": ids, "attention_mask": torch.ones(4, 16)}, num_samples=16,
                rank=4)
    # other rows by design: MusicGen's ids hold one row per codebook per example, its mask one row per example
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    config = MusicgenDecoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   ffn_dim=64, num_codebooks=4)
    mask = torch.ones(2, 32)
    mask[1, 24:] = 0
    result = profile(MusicgenForCausalLM(config), {"input_ids": torch.randint(0, 64, (8, 32)), "attention_mask": mask},
                     num_samples=32, rank=4)
    assert result.meta["tokens_seen"] == 56  # the padding is masked out


def test_negative_ids_a_model_maps_itself_are_profiled():
    model = tiny_model("llama")
    embed = model.get_input_embeddings()
    plain = embed.forward
    embed.forward = lambda ids: plain(ids.clamp_min(0))  # as remote-code vision-language models treat placeholders
    ids = torch.randint(0, 100, (2, 32))
    ids[:, :8] = -1
    assert profile(model, ids, num_samples=32, rank=4).meta["tokens_seen"] == 64


def test_multiple_choice_inputs_embeds_are_taken():
    from transformers import BertConfig, BertForMultipleChoice

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    embeds = torch.randn(2, 3, 16, 32)  # (batch, choices, sequence, width)
    assert profile(BertForMultipleChoice(config), {"inputs_embeds": embeds}, num_samples=32, rank=4).layers


def test_a_trainer_passed_to_profile_is_told_to_pass_its_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=tiny_model("llama"), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(TypeError, match=r"got Trainer; pass the model it holds: profile\(trainer.model\)"):
        profile(trainer)
    with pytest.raises(TypeError, match=r"got dict; load the model first"):
        profile({"input_ids": [1, 2]})


def test_snapshots_in_the_wrong_container_name_the_triple_expected():
    from hf_koopman.profiling import profile_from_snapshots

    X = torch.randn(64, 4)
    for wrong, got in (([(X, X)], "a 2-tuple"), ({"a": (X, X)}, "dict"), (("a", X, X), "tuple")):
        with pytest.raises(TypeError, match=rf"(name, X, Y)|{got}") as info:
            profile_from_snapshots(wrong, progress=False)
        assert "(name, X, Y)" in str(info.value) and got in str(info.value)
