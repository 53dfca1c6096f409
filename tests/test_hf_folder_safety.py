"""`hf:` folders that would run their own code, or whose weights do not fit their config, are one
line naming the file or the tensors at fault (issue 20, items 5, 10 and 14), and nothing of the
folder runs; good folders (tied embeddings, a swapped or resized head, pickled plain tensors)
still load. Each folder is a tiny `save_pretrained` model made here, loaded with `load_model`."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_clean_failure, run_cli  # tests/ is on sys.path (pytest rootdir)
from test_data import tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from compile_toolkit.errors import CtkError
from compile_toolkit.models import load_model
from compile_toolkit.workload import load_workload

VOCAB = 32
# Python that writes ``marker`` when imported: a folder's modelling code, run or not.
MARKER_CODE = "from pathlib import Path\nPath({marker!r}).write_text('the folder ran its code')\n"


def llama_folder(folder: Path, tie: bool = False) -> Path:
    """A 2-layer LlamaForCausalLM of width 16, saved as safetensors."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def edit_weights(folder: Path, edit) -> None:
    """Rewrite the folder's ``model.safetensors`` with ``edit(tensors)`` applied."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def error_of(spec: str, **options) -> str:
    with pytest.raises(CtkError) as caught:
        load_model(spec, **options)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def answer_yes(monkeypatch):
    """The user answers `y` to transformers' "Do you wish to run the custom code? [y/N]"."""
    monkeypatch.setattr(builtins, "input", lambda *args: "y")


def custom_code_folder(folder: Path, marker: Path) -> Path:
    """A folder of an architecture transformers does not know, whose config maps it to modelling
    code in the folder; that code writes ``marker`` when imported."""
    folder.mkdir()
    config = {"model_type": "ctk-marker", "architectures": ["MarkerForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_marker.MarkerConfig",
                           "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_marker.py", "modeling_marker.py"):
        (folder / name).write_text(MARKER_CODE.format(marker=str(marker)))
    return folder


def test_custom_modelling_code_is_refused_and_never_runs(tmp_path, answer_yes, capsys):
    """Through the CLI: one `ctk: error:` line naming auto_map, exit status 1, no marker."""
    marker = tmp_path / "marker"
    folder = custom_code_folder(tmp_path / "custom", marker)
    status, err = run_cli(["strip", "--model", f"hf:{folder}"], capsys)
    assert_clean_failure(status, err, "auto_map", str(folder / "config.json"))
    assert status == 1
    assert not marker.exists()


def test_auto_map_of_a_known_architecture_is_refused(tmp_path, answer_yes):
    """A Llama folder whose config also maps to code in the folder: refused, not quietly loaded
    as a Llama that may differ from what its author's code computes."""
    folder = llama_folder(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_marker.py").write_text(MARKER_CODE.format(marker=str(tmp_path / "marker")))
    assert "auto_map" in error_of(f"hf:{folder}")
    assert not (tmp_path / "marker").exists()


def test_custom_tokenizer_code_is_refused_and_never_runs(tmp_path, answer_yes):
    """tokenizer_config.json with auto_map, reached first through text data (the tokenizer is
    read before the model there)."""
    marker = tmp_path / "marker"
    folder = llama_folder(tmp_path / "llama")
    tiny_tokenizer(["a b c d"]).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_marker.MarkerTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_marker.py").write_text(MARKER_CODE.format(marker=str(marker)))
    text = tmp_path / "corpus.txt"
    text.write_text("a b c d\n" * 40)
    with pytest.raises(CtkError) as caught:
        load_workload(f"hf:{folder}", str(text), task="causal-lm", seq_len=8, batch_size=4)
    message = str(caught.value)
    assert "\n" not in message and "auto_map" in message and "tokenizer_config.json" in message, message
    assert not marker.exists()


def test_missing_tensors_are_named_not_filled_with_random_values(tmp_path):
    """The issue's case: 11 tensors gone, and the model used to run on random values for them."""
    folder = llama_folder(tmp_path / "llama")
    dropped = sorted(load_file(folder / "model.safetensors"))[:11]
    edit_weights(folder, lambda tensors: [tensors.pop(key) for key in dropped])
    message = error_of(f"hf:{folder}")
    assert "lack 11 tensors" in message and repr(dropped[0]) in message and "more" in message, message
    assert len(message) < 400, message


def test_a_missing_body_tensor_is_an_error_even_when_the_head_is_swapped(tmp_path):
    """Classifying with a causal LM folder swaps its head (``score`` is new, ``lm_head`` left
    over); a tensor of the body missing is still named, and the head's are not."""
    folder = llama_folder(tmp_path / "llama")
    edit_weights(folder, lambda t: t.pop("model.norm.weight"))
    message = error_of(f"hf:{folder}", task="classify", num_classes=3)
    assert "lack 1 tensor " in message and "'model.norm.weight'" in message and "score" not in message, message


def test_unexpected_tensors_are_named(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    edit_weights(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(32, 16)}))
    message = error_of(f"hf:{folder}")
    assert "hold 1 tensor " in message and "'model.layers.2.mlp.up_proj.weight'" in message, message


def test_a_mis_shaped_tensor_is_named_with_both_shapes(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    edit_weights(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(5, 16)}))
    message = error_of(f"hf:{folder}")
    assert "'model.layers.0.mlp.up_proj.weight'" in message and "[5, 16]" in message and "[32, 16]" in message, message


def test_a_truncated_safetensors_file_is_named(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = error_of(f"hf:{folder}")
    assert str(path) in message and "not a valid safetensors file" in message, message


def pickled_folder(tmp_path: Path, extra: object = None) -> Path:
    """The Llama folder with its weights as ``pytorch_model.bin`` (and ``extra`` pickled in it)."""
    folder = llama_folder(tmp_path / "llama")
    state = load_file(folder / "model.safetensors")
    if extra is not None:
        state["extra"] = extra
    torch.save(state, folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    return folder


class WritesMarker:
    """Unpickling this calls ``Path(marker).write_text(...)``: code run by loading weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "the pickle ran its code")


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    folder = pickled_folder(tmp_path, WritesMarker(marker))
    message = error_of(f"hf:{folder}")
    assert str(folder / "pytorch_model.bin") in message and "weights_only=True" in message, message
    assert "GLOBAL" in message and len(message) < 400, message
    assert not marker.exists()


def test_a_truncated_pickle_is_named(tmp_path):
    folder = pickled_folder(tmp_path)
    path = folder / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    message = error_of(f"hf:{folder}")
    assert str(path) in message and "not a readable PyTorch weights file" in message, message


# Positive controls: what the checks must let through.


def test_a_good_folder_loads_with_the_folder_s_weights(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    loaded = load_model(f"hf:{folder}")
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(loaded.module.model.state_dict()[k], v) for k, v in saved.items())


def test_a_plain_pickled_state_dict_loads(tmp_path):
    folder = pickled_folder(tmp_path)
    assert load_model(f"hf:{folder}").task == "causal-lm"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tied_embeddings_are_not_missing(tmp_path, kind):
    """The folder holds no ``lm_head.weight``: it is the embedding matrix."""
    folder = tmp_path / kind
    if kind == "llama":
        llama_folder(folder, tie=True)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)
        GPT2LMHeadModel(config).save_pretrained(folder)
    assert not any(k.startswith("lm_head") for k in load_file(folder / "model.safetensors"))
    model = load_model(f"hf:{folder}").module.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_a_swapped_and_a_resized_head_load(tmp_path):
    """A causal LM folder as a 3-way classifier (new ``score``, ``lm_head`` dropped), and that
    classifier, saved, re-sized to 5 classes (``score`` re-shaped)."""
    folder = llama_folder(tmp_path / "llama")
    classifier = load_model(f"hf:{folder}", task="classify", num_classes=3).module.model
    classifier.save_pretrained(tmp_path / "classifier")
    resized = load_model(f"hf:{tmp_path / 'classifier'}", num_classes=5)
    assert resized.module.model.score.weight.shape == (5, 16)
    assert any("newly initialised for 5 classes" in note for note in resized.notes)



def test_an_encoder_saved_without_its_pooler_loads_for_embed_without_one(tmp_path):
    """``BertModel(add_pooling_layer=False)`` folders (sentence encoders) lack the pooler that the
    embed task never reads: loaded without one, not refused and not filled at random; a missing
    encoder tensor is still refused."""
    from test_workloads import bert_encoder

    from compile_toolkit.models import load_model

    folder = bert_encoder(tmp_path / "bert")
    loaded = load_model(f"hf:{folder}")
    assert loaded.task == "embed" and loaded.module.model.pooler is None
    assert not any(name.startswith("model.pooler") for name, _ in loaded.module.named_parameters())
    weights = load_file(str(folder / "model.safetensors"))
    del weights["encoder.layer.0.output.dense.bias"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CtkError, match="encoder.layer.0.output.dense.bias"):
        load_model(f"hf:{folder}")
