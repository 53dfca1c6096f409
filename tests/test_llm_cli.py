"""Language models through the CLI: `ctk export --pruned` and `ctk prune` with --structure,
--method, --pattern and --calibration-samples on tiny `save_pretrained` Llama folders (grouped-query
attention, nothing downloaded), the `hf` format loaded back with AutoModelForCausalLM, greedy
generation from the exported ONNX file, bad input as one line with nothing written, and (slow) the
real SmolLM2-135M end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_clean_failure, run_cli
from test_workloads import SEQ, corpus_txt, llama_lm, save_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import compile_toolkit as ctk
from compile_toolkit.llm import CausalLMLogits
from compile_toolkit.pruning.llm.structured import prune_llm_structured


def export_lm(tmp_path: Path, *extra: str, model: Path | None = None) -> tuple[list[str], Path]:
    model = model or llama_lm(tmp_path / "llama")
    out = tmp_path / "out"
    return ["export", "--pruned", "--model", f"hf:{model}", "--data", str(corpus_txt(tmp_path / "corpus.txt")),
            "--seq-len", str(SEQ), "--finetune-epochs", "1", "--batch-size", "8", "--out", str(out), *extra], out


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("structure, sparsity, widths", [("neuron", "0.25", (4, 2, 48)), ("head", "0.5", (2, 1, 32)),
                                                       ("query_head", "0.5", (2, 2, 64))])
def test_structured_export_writes_a_transformers_folder(tmp_path, capsys, structure, sparsity, widths):
    """`neuron` 25%: 64 -> 48 MLP neurons; `head` 50%: one of the two key/value groups with its two
    query heads, and half the neurons; `query_head` 50%: one of the two query heads of each group,
    both key/value heads kept. The hf folder's config says so, it loads with AutoModelForCausalLM
    and computes the ONNX file's logits; the tokenizer is beside it."""
    args, out = export_lm(tmp_path, "--structure", structure, "--sparsity", sparsity, "--formats", "hf,onnx")
    status, err = run_cli(args, capsys)
    assert status == 0, err
    report = report_of(out)
    assert {a["format"] for a in report["artifacts"]} == {"hf", "onnx"} and "skipped" not in report
    assert report["pruning"]["importance"] == "activation" and report["pruning"]["calibration_samples"] > 0
    if structure == "query_head":
        assert report["pruning"]["removed_query_heads_per_group"] == [1, 1]
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    config = hf.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == widths
    assert (out / "hf" / "tokenizer.json").is_file()
    ids = torch.randint(0, config.vocab_size, (3, 11))  # another batch and length than the capture's
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
    np.testing.assert_allclose(session.run(None, {"input_ids": ids.numpy()})[0], expected, atol=1e-4)


def test_per_layer_widths_skip_hf_and_write_the_rest(tmp_path, capsys):
    """Neurons ranked across layers keep 47 and 49 of 64: no transformers config has that, so hf
    is skipped with the reason (report and notes) and ONNX and .pt2 are still written."""
    args, out = export_lm(tmp_path, "--structure", "neuron", "--sparsity", "0.25", "--per-layer", "--formats", "hf,onnx,pt2")
    status, err = run_cli(args, capsys)
    assert status == 0, err
    report = report_of(out)
    assert "same intermediate_size in every layer" in report["skipped"]["hf"]
    assert any("hf folder not written" in note for note in report["notes"])
    assert {a["format"] for a in report["artifacts"]} == {"onnx", "pt2"} and not (out / "hf").exists()


@pytest.mark.parametrize("method, pattern", [("wanda", "2:4"), ("sparsegpt", None)])
def test_unstructured_methods_through_export_and_prune(tmp_path, capsys, method, pattern):
    """`ctk export --pruned --method` reaches prune_llm (every decoder weight at its sparsity, N:M
    per row); `ctk prune` writes weights and masks under the transformers model's own names,
    which `--weights` loads back."""
    extra = ["--method", method, *(["--pattern", pattern] if pattern else []), "--formats", "onnx"]
    args, out = export_lm(tmp_path, *extra, "--no-finetune")
    status, err = run_cli(args, capsys)
    assert status == 0, err
    pruning = report_of(out)["pruning"]
    assert pruning["method"] == method and set(pruning["layers"].values()) == {0.5}
    folder = tmp_path / "llama"
    pruned = tmp_path / "pruned"
    status, err = run_cli(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "corpus.txt"), "--seq-len",
                           str(SEQ), *extra[:-2], "--out", str(pruned)], capsys)
    assert status == 0, err
    weights, masks = load_file(pruned / "pruned.safetensors"), load_file(pruned / "masks.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert name in weights and name in masks and float((weights[name] == 0).float().mean()) == 0.5
    if pattern:
        assert (masks[name].view(masks[name].shape[0], -1, 4).sum(-1) == 2).all()
    status, err = run_cli(["strip", "--model", f"hf:{folder}", "--weights", str(pruned / "pruned.safetensors")], capsys)
    assert status == 0, err


def test_stablehlo_of_a_pruned_causal_lm_runs_on_the_xla_cpu_device(tmp_path, capsys):
    """Prefill (the full forward pass) of a Llama with half its key/value groups and neurons
    stripped, lowered by torch_xla and run on the XLA CPU device against the stripped model; XLA
    takes static shapes, so the artifact records the example's batch and sequence length."""
    args, out = export_lm(tmp_path, "--structure", "head", "--sparsity", "0.5", "--no-finetune",
                          "--formats", "stablehlo")
    status, err = run_cli(args, capsys)
    assert status == 0, err
    artifact = {a["format"]: a for a in report_of(out)["artifacts"]}["stablehlo"]
    assert artifact["max_abs_error"] < 1e-4
    assert artifact["runtime"].startswith("torch_xla") and artifact["details"]["static_shapes"][0][1] == SEQ
    mlir = (out / "stablehlo" / "model.mlir").read_text()
    assert "stablehlo.dot_general" in mlir and "stablehlo.exponential" in mlir  # matmuls and the softmax
    assert report_of(out)["stripped"]["params"] < report_of(out)["dense"]["params"]


def test_block_pruning_removes_decoder_layers(tmp_path, capsys):
    args, out = export_lm(tmp_path, "--structure", "block", "--formats", "hf,onnx")
    status, err = run_cli(args, capsys)
    assert status == 0, err
    assert report_of(out)["pruning"]["removed_blocks"] == [report_of(out)["pruning"]["steps"][0]["kept"].index(0)]
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.num_hidden_layers == 1


def odd_llama(folder: Path) -> Path:
    """A Llama folder of width 36 (2 heads of 18 over 1 key/value head): no multiple of 8."""
    tokenizer = save_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def unsupported_gguf(path: Path) -> Path:
    """A GGUF file whose header names the gpt2 architecture (no rules here)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["n:m width", "sparsegpt calibration", "too few groups", "too few query heads",
                                  "unsupported gguf",
                                  "method on an image model", "query heads of an image model",
                                  "pattern without method", "hf of an image model"])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "n:m width":
        args, out = export_lm(tmp_path, "--method", "wanda", "--pattern", "4:8", model=odd_llama(tmp_path / "odd"))
        needles = ["pattern '4:8'", "model.layers.0.self_attn.q_proj has 36 inputs", "M=8"]
    elif kind == "sparsegpt calibration":
        args, out = export_lm(tmp_path, "--method", "sparsegpt", "--calibration-samples", "1")
        needles = ["sparsegpt: model.layers.0.mlp.down_proj has 64 inputs", f"has {SEQ} tokens"]
    elif kind == "too few groups":
        args, out = export_lm(tmp_path, "--structure", "attention_head", "--sparsity", "0.3")
        needles = ["sparsity 0.3 removes no kv_group (layers have 2)"]
    elif kind == "too few query heads":
        args, out = export_lm(tmp_path, "--structure", "query_head", "--sparsity", "0.4")
        needles = ["sparsity 0.4 removes no query_head", "each key/value group has 2 query heads",
                   "the same number in every group"]
    elif kind == "unsupported gguf":
        gguf_file = unsupported_gguf(tmp_path / "tiny-gpt2.gguf")
        args = ["export", "--pruned", "--model", str(gguf_file), "--structure", "neuron", "--out", str(out)]
        needles = [str(gguf_file), "GGUF architecture 'gpt2' has no rules", "llama, mistral, qwen2"]
    elif kind == "method on an image model":
        args = ["export", "--pruned", "--method", "wanda", "--out", str(out)]
        needles = ["--method wanda prunes the decoder layers of a causal language model", "DigitsResNet"]
    elif kind == "query heads of an image model":
        args = ["export", "--pruned", "--structure", "query_head", "--out", str(out)]
        needles = ["--structure query_head prunes the decoder layers of a causal language model", "DigitsResNet"]
    elif kind == "pattern without method":
        args = ["prune", "--pattern", "2:4", "--out", str(out)]
        needles = ["--pattern 2:4", "give --method"]
    else:
        args = ["export", "--formats", "hf,onnx", "--out", str(out)]
        needles = ["--formats hf", "digits-resnet is not one"]
    status, err = run_cli(args, capsys)
    assert_clean_failure(status, err, *needles)
    assert not out.exists()


def test_hf_format_of_a_model_with_tied_embeddings(tmp_path):
    """SmolLM2 ties its head to its embedding, and the captured graph names the one parameter
    lm_head.weight: the folder stores it as the embedding and computes the stripped logits."""
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prune_llm_structured(model, [torch.randint(0, 96, (4, 32))], "neuron", 0.25)
    example = torch.randint(0, 96, (2, 12))
    wrapped = CausalLMLogits(model)
    stripped = ctk.strip(wrapped, (example,))
    (artifact,) = ctk.export(stripped, (example,), str(tmp_path), formats=("hf",), reference=wrapped, pretrained=model)
    assert artifact.max_abs_error < 1e-5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.intermediate_size == 96


def greedy(step, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole prefix each step (``step``: ids -> logits)."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, step(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def test_onnx_greedy_generation_equals_the_stripped_model(tmp_path):
    """A random Llama with 8 query heads over 4 key/value heads, half its groups and a quarter of
    its neurons pruned and stripped: 32 tokens generated greedily from model.onnx in ONNX Runtime
    (dynamic batch and sequence length: prompts of 8 tokens growing to 39, at batch 2) are the
    stripped PyTorch model's tokens."""
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    calibration = [torch.randint(0, 96, (4, 32))]
    prune_llm_structured(model, calibration, "kv_group", 0.5)
    prune_llm_structured(model, calibration, "neuron", 0.25)
    example = torch.randint(0, 96, (2, 12))
    stripped = ctk.strip(CausalLMLogits(model), (example,))
    assert dict(stripped.named_parameters())["model.model.layers.0.self_attn.k_proj.weight"].shape[0] == 16
    (artifact,) = ctk.export(stripped, (example,), str(tmp_path), formats=("onnx",))
    session = onnxruntime.InferenceSession(artifact.path)
    assert [type(d) for d in session.get_inputs()[0].shape] == [str, str]  # symbolic batch and sequence

    def onnx_step(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])

    prompt = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        expected = greedy(stripped, prompt, 32)
    generated = greedy(onnx_step, prompt, 32)
    assert generated.shape == (2, 32) and torch.equal(generated, expected)
    assert len(set(expected[0].tolist())) > 1  # not a constant stream: a real check


def pydoc_folder(folder: Path, train_chars: int, val_chars: int) -> Path:
    """Real pydoc text as a train/val folder: the first topics of the calibration part (training
    and calibration) and of the held-out part."""
    from compile_toolkit.llm import write_pydoc_folder

    return write_pydoc_folder(folder, ("calibration", train_chars), ("heldout", val_chars))


@pytest.mark.slow
def test_smollm2_neuron_pruning_end_to_end_through_the_cli(tmp_path, capsys):
    """The real model: 25% of the MLP neurons of every layer pruned on 32 sequences of pydoc
    text, no fine-tuning, stripped and written as a transformers folder and ONNX; held-out
    perplexity (about 1,800 tokens of pydoc topics: the job evaluates it four times) is in the
    model's range for the dense model, higher and equal in ONNX Runtime for the stripped one, and
    the folder loads back with 1152 neurons per layer."""
    out = tmp_path / "smollm2"
    data = pydoc_folder(tmp_path / "pydoc", train_chars=20_000, val_chars=7_000)
    status, err = run_cli(["export", "--model", "smollm2-135m", "--pruned", "--structure", "neuron", "--sparsity",
                           "0.25", "--data", str(data), "--calibration-samples", "32", "--no-finetune",
                           "--batch-size", "8", "--formats", "hf,onnx", "--out", str(out)], capsys)
    assert status == 0, err
    report = report_of(out)
    assert report["metric"]["name"] == "perplexity"
    metric = report["metric"]  # on the first 8 held-out topics (28 k characters): dense 26.95, pruned 37.80
    assert 10 < metric["dense"] < 40 and metric["dense"] < metric["stripped"] == metric["onnx"] < 2.5 * metric["dense"]
    assert report["stripped"]["params"] < report["dense"]["params"]
    assert [a["format"] for a in report["dense"]["artifacts"]] == ["onnx"]  # no dense file the job was not asked for
    config = json.loads((out / "hf" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"], config["num_hidden_layers"]) == (1152, 3, 30)
