"""``ctk export --pruned --target-speedup X``: each channel group's width chosen over the
runtime's measured per-layer latency table, checked end to end (pruned, stripped, exported,
verified and timed against the dense model), the model pruned to exactly those widths; the report
puts the final measured speedup beside the target; an unreachable target is one line. The
uniform baseline (one sparsity bisected over probes) is tested here too."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from test_cli import assert_clean_failure, run_cli

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.latency_target import MAX_SPARSITY, RESOLUTION, LatencyBudget, choose_sparsity
from compile_toolkit.metrics import RUNTIMES
from compile_toolkit.models import load_model
from compile_toolkit.pruning.configs import Channels


def test_the_job_prunes_each_group_to_its_chosen_width_and_reports_the_measured_speedup(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTK_CACHE_DIR", str(tmp_path / "cache"))  # its own table: other tests time digits-resnet too
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--target-speedup", "1.3", "--no-finetune", "--formats", "onnx",
                           "--out", str(out)], capsys)
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    target = report["pruning"]["target"]
    assert target["target"] == 1.3 and target["runtime"] == "ort" and target["precision"] == "fp32"
    assert target["table"]["measured"] > 0 and Path(target["table"]["path"]).is_file()  # measured, then cached
    assert target["probes"][0]["speedup"] >= 1.3  # the narrowest widths: the target can be met
    assert target["probe_speedup"] >= 1.3 and target["probe_speedup"] in [p["speedup"] for p in target["probes"]]
    checked = 0
    for width in target["widths"]:  # the model was pruned to exactly the chosen widths
        mine = [g for g in report["pruning"]["groups"]
                if any(c.rpartition(":")[0] == width["carrier"] for c in g["carriers"])]
        if len(mine) == 1:  # a carrier of this group alone (a norm's scale)
            assert mine[0]["channels"] - mine[0]["pruned"] == width["kept"], (width, mine)
            checked += 1
    assert checked >= len(target["widths"]) / 2 and any(w["kept"] < w["channels"] for w in target["widths"])
    assert report["sparsity"] == target["sparsity"] > 0
    assert target["speedup"] == report["speedup"] and target["met"] == (report["speedup"] >= 1.3)
    assert target["latency_ms"] == report["stripped"]["latency_ms"]
    verdict = "met" if target["met"] else "NOT met"
    assert "Target: 1.3x at batch 1 in ONNX Runtime; each group's width" in (out / "report.md").read_text()
    assert f"{target['speedup']:.2f}x, {verdict}." in (out / "report.md").read_text()


def test_a_latency_budget_is_the_speedup_over_the_dense_model_as_timed_here():
    """``--target-latency-ms``: the dense model is timed in the runtime, the budget becomes a
    speedup over it; a budget the dense model already meets is one line."""
    loaded = load_model("digits-resnet")
    module, example = loaded.module, loaded.example_inputs
    with tempfile.TemporaryDirectory() as folder:
        path = ctk.export(copy.deepcopy(module), example, folder, formats=("onnx",))[0].path
        batch1 = tuple(t[:1] for t in example)
        dense_ms = RUNTIMES["ort"].latency_ms(path, batch1)
        speedup = LatencyBudget(dense_ms / 2).speedup(path, batch1, "ort")
        assert 1.4 < speedup < 2.8  # twice as fast, within this machine's run-to-run noise
        with pytest.raises(CtkError, match=r"--target-latency-ms 1e\+06: the dense model already runs in .* ms in ort"):
            LatencyBudget(1e6).speedup(path, batch1, "ort")


def test_one_sparsity_for_every_group_is_the_smallest_that_meets_the_target():
    """The bisection heads and neurons use, on the digits model's channels: every probe below the
    chosen sparsity missed the target, and the bracket closed."""
    loaded = load_model("digits-resnet")
    choice = choose_sparsity(loaded.module, loaded.example_inputs, Channels(), 1.3, "ort", rounds=6, budget_s=3.0)
    probes = choice.probes
    assert probes[0].sparsity == MAX_SPARSITY and probes[0].speedup >= 1.3
    assert 0 < choice.sparsity <= MAX_SPARSITY and choice.probe_speedup >= 1.3
    below = [p.sparsity for p in probes if p.sparsity < choice.sparsity]
    assert all(p.speedup < 1.3 for p in probes if p.sparsity < choice.sparsity)
    assert choice.sparsity - max(below, default=0.0) <= RESOLUTION


def test_an_unreachable_target_is_one_line_before_any_fine_tuning(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--target-speedup", "1000", "--formats", "onnx", "--out", str(out)],
                          capsys)
    assert_clean_failure(status, err, "--target-speedup 1000 cannot be met in ort", "narrowest widths",
                         f"{MAX_SPARSITY:.0%}")
    assert "fine-tune" not in err and not out.exists()


def test_target_speedup_options_are_checked_before_any_work(tmp_path, capsys):
    for args, needle in ((["--target-speedup", "2"], "add --pruned"),
                         (["--pruned", "--target-speedup", "2", "--sparsity", "0.3"], "drop --sparsity"),
                         (["--pruned", "--target-speedup", "0.5"], "above 1"),
                         (["--pruned", "--target-speedup", "nan"], "above 1"),
                         (["--pruned", "--target-speedup", "2", "--method", "wanda"], "--method wanda prunes the decoder"),
                         (["--pruned", "--target-latency-ms", "0"], "--target-latency-ms must be a finite number above 0"),
                         (["--target-latency-ms", "5"], "add --pruned"),
                         (["--pruned", "--target-latency-ms", "5", "--sparsity", "0.3"], "drop --sparsity"),
                         (["--pruned", "--target-latency-ms", "5", "--target-speedup", "2"], "give one")):
        status, err = run_cli(["export", *args, "--out", str(tmp_path / "out")], capsys)
        assert_clean_failure(status, err, needle)
        assert not (tmp_path / "out").exists()


def test_a_causal_lms_heads_and_neurons_together_are_probed_pruned_on_calibration_text():
    """The uniform baseline of ``head`` (key/value groups and neurons) bisects one sparsity: its
    first probe prunes 90% of both on the calibration tokens, strips,
    exports and times the prefill at batch 1, and a target beyond it is one line naming the
    speedup it measured; a structure that leaves the module before capture (blocks) is refused.
    The bisection itself: test_one_sparsity_for_every_group_is_the_smallest_that_meets_the_target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compile_toolkit.llm import CausalLMLogits
    from compile_toolkit.pruning.configs import DecoderStructures
    from compile_toolkit.pruning.prune_ import PruneData

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = CausalLMLogits(LlamaForCausalLM(config).eval()).eval()
    ids = torch.randint(0, 64, (2, 64))
    tokens = [torch.randint(0, 64, (4, 64)) for _ in range(2)]
    with pytest.raises(CtkError, match=r"--target-speedup 100 cannot be met in ort on this machine: pruning 90% of "
                                       r"every group runs only \d+\.\d\dx faster"):
        choose_sparsity(model, (ids,), DecoderStructures("head"), 100.0, "ort", PruneData(tokens=tokens),
                        rounds=4, budget_s=0.5)
    with pytest.raises(CtkError, match="not for DecoderStructures pruning of block"):
        choose_sparsity(model, (ids,), DecoderStructures("block", 0.5), 1.3, "ort", PruneData(tokens=tokens))


def test_a_causal_lm_keeps_each_layers_mlp_neurons_by_their_importance_at_the_latency_target():
    """Each decoder layer's MLP neurons are a group of its own, costed by its projections at the
    prefill length: a layer whose activation is held by a few neurons (layer 0 here) gives up more
    of the rest than a layer whose neurons all matter alike (positive control: the layers differ
    in nothing else); the chosen widths meet the target as timed end to end and are pruned
    exactly. Key/value groups plan the same way; a structure that is not a width is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compile_toolkit.latency.decoder import decoder_plan
    from compile_toolkit.latency_target import choose_widths
    from compile_toolkit.llm import CausalLMLogits
    from compile_toolkit.pruning.configs import DecoderStructures
    from compile_toolkit.pruning.prune_ import PruneData, prune_

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = CausalLMLogits(LlamaForCausalLM(config).eval()).eval()
    with torch.no_grad():
        model.model.model.layers[0].mlp.up_proj.weight[:64] *= 20  # 64 neurons carry layer 0's activation
    ids = torch.randint(0, 64, (2, 64))
    tokens = [torch.randint(0, 64, (4, 64)) for _ in range(2)]
    choice = choose_widths(model, (ids,), DecoderStructures("neuron"), 1.3, "ort", PruneData(tokens=tokens),
                           rounds=6, budget_s=1.0)
    kept = [w["kept"] for w in choice.widths]
    assert [w["channels"] for w in choice.widths] == [1024, 1024] and choice.probe_speedup >= 1.3
    assert choice.timed_inputs == [[1, 64]]  # the prefill at batch 1 over the example's tokens
    assert kept[0] < kept[1] <= 1024, kept
    assert choice.config.kept == {"neuron": tuple(kept)}
    pruned = copy.deepcopy(model)
    prune_(pruned, choice.config, PruneData(tokens=tokens))
    for layer, width in zip(pruned.model.model.layers, kept, strict=True):
        assert int(layer.mlp.gate_proj.weight.any(1).sum()) == width
        assert int(layer.mlp.down_proj.weight.any(0).sum()) == width
    assert pruned.model.model.layers[0].mlp.up_proj.weight[:64].any(1).all()  # the strong neurons stay

    heads = decoder_plan(model, (ids,), DecoderStructures("attention_head"), tokens, 8, 0.9)
    assert [o.size for o in heads.options] == [2, 2] and [o.widths for o in heads.options] == [(1, 2), (1, 2)]
    assert [layer.cout.width((1, 2), (2, 2)) for layer in heads.layers[:3]] == [32, 16, 16]  # q, k, v of layer 0
    with pytest.raises(CtkError, match="not for DecoderStructures pruning of block"):
        choose_widths(model, (ids,), DecoderStructures("block"), 1.3, "ort", PruneData(tokens=tokens))


def test_a_latency_target_is_met_by_the_measured_latency_not_by_the_speedup_it_became():
    from types import SimpleNamespace

    from compile_toolkit.export_job import ExportJob
    from compile_toolkit.export_prune import target_met

    def report(speedup: float, stripped_ms: float) -> SimpleNamespace:
        return SimpleNamespace(latency=SimpleNamespace(speedup=speedup), stripped=SimpleNamespace(latency_ms=stripped_ms))

    by_ms = ExportJob(pruned=True, target_latency_ms=5.0)
    assert target_met(by_ms, report(1.9, 4.9)) == {"speedup": 1.9, "latency_ms": 4.9, "target_latency_ms": 5.0,
                                                   "met": True}
    assert not target_met(by_ms, report(2.5, 5.1))["met"]  # faster than asked relative to dense, still too slow
    by_speedup = ExportJob(pruned=True, target_speedup=2.0)
    assert target_met(by_speedup, report(2.0, 9.0))["met"] and not target_met(by_speedup, report(1.99, 1.0))["met"]


def test_a_transformers_encoder_prunes_each_mlp_to_the_neuron_width_chosen_for_the_target(tmp_path, capsys):
    """``--structure neuron`` on an hf: encoder whose MLPs dominate its cost: each layer's neurons
    get their own width from the latency table (linear layers at the sequence length), the choice
    is timed end to end and the model is pruned to exactly those widths."""
    from test_workloads import corpus_txt, save_tokenizer
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    tokenizer = save_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--model", f"hf:{folder}", "--data", str(corpus_txt(tmp_path / "c.txt")),
                           "--seq-len", "64", "--batch-size", "8", "--structure", "neuron", "--target-speedup", "1.2",
                           "--no-finetune",
                           "--formats", "onnx", "--out", str(out)], capsys)
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    target = report["pruning"]["target"]
    assert [w["channels"] for w in target["widths"]] == [1024, 1024]  # the two MLPs, nothing else
    assert target["probe_speedup"] >= 1.2 and any(w["kept"] < 1024 for w in target["widths"])
    for width in target["widths"]:  # pruned to exactly the chosen widths
        group = next(g for g in report["pruning"]["groups"]
                     if any(c.rpartition(":")[0] == width["carrier"] for c in g["carriers"]))
        assert group["channels"] - group["pruned"] == width["kept"], (width, group)
    assert "choose each neuron group's width for 1.2x" in err and report["strip"]["channels_removed"] > 0
