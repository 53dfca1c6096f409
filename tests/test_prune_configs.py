"""One vocabulary of pruning: the CLI, recipe files and ``ctk train`` build the same typed configs
(:mod:`compile_toolkit.pruning.configs`), and ``prune_`` carries each out the same way."""

from __future__ import annotations

import copy

import pytest
import torch
from test_importance import FourHeads, loud_but_dead_mlp
from test_pruning_methods import ConvBN
from torch import nn

from compile_toolkit.cli import _parser
from compile_toolkit.errors import CtkError
from compile_toolkit.options import from_args
from compile_toolkit.pruning.configs import NM, Channels, DecoderStructures, Magnitude, Wanda, method_config
from compile_toolkit.pruning.llm.plan import PruneOptions
from compile_toolkit.pruning.prune_ import PruneData, needs, prune_
from compile_toolkit.pruning.recipe import recipe_from_dict

STRUCTURED = [  # (structure, a model that has it, its example input)
    ("channel", ConvBN, (torch.randn(2, 3, 4, 4),)),
    ("neuron", loud_but_dead_mlp, (torch.rand(4, 4),)),
    ("attention_head", FourHeads, (torch.randn(2, 5, 16),)),
    ("head", FourHeads, (torch.randn(2, 5, 16),)),
]


def cli_options(*flags: str) -> PruneOptions:
    args = _parser().parse_args(["export", "--pruned", *flags])
    return from_args(PruneOptions, args)


def zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


def same_masks(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("importance", ["l1", "l2", "random", "bn_scale", "taylor", "mask_gradient"])
@pytest.mark.parametrize(("structure", "make", "inputs"), STRUCTURED, ids=[s[0] for s in STRUCTURED])
def test_cli_and_recipe_build_one_channels_config_that_prunes_the_same(structure, make, inputs, importance):
    torch.manual_seed(0)
    model = make().eval()
    from_cli = cli_options("--sparsity", "0.5", "--structure", structure, "--importance", importance).config(model)
    from_recipe = recipe_from_dict({"method": "structured", "structure": structure, "importance": importance,
                                    "schedule": {"final_sparsity": 0.5}}).config
    assert from_cli == from_recipe == Channels(0.5, structure, importance)
    if importance == "bn_scale" and structure != "channel":
        return  # scores batch norms only: these models have none (prune refuses, tested there)
    twin = copy.deepcopy(model)
    before = zeros(model)
    # what data-driven criteria read, the same for both (the jobs take it from --data)
    data = PruneData(inputs, [inputs], loss=lambda m: m(*inputs).square().mean())
    first = prune_(model, from_cli, data)
    second = prune_(twin, from_recipe, data)
    assert zeros(model) > before, "the config pruned nothing"
    assert same_masks(first.masks, second.masks)
    assert first.summary["pruned"] == second.summary["pruned"] > 0


@pytest.mark.parametrize("method", ["magnitude", "2:4", "channel"])
def test_ctk_train_and_recipe_build_the_same_config_and_masks(method):
    """``ctk train --prune-method`` and a recipe's ``method`` name the same configs."""
    sparsity = 0.5
    from_train = method_config(method, sparsity)
    recipe = {"method": "structured", "schedule": {"final_sparsity": sparsity}} if method == "channel" else {
        "method": method, "schedule": {"final_sparsity": sparsity}}
    assert from_train == recipe_from_dict(recipe).config
    torch.manual_seed(0)
    model, inputs = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), (torch.randn(2, 16),)
    twin = copy.deepcopy(model)
    first = prune_(model, from_train, PruneData(inputs))
    second = prune_(twin, recipe_from_dict(recipe).config, PruneData(inputs))
    assert same_masks(first.masks, second.masks) and any((~m).any() for m in first.masks.values())


def test_magnitude_config_prunes_its_sparsity_and_nm_its_pattern():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    report = prune_(model, Magnitude(0.75))
    assert report.summary["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert int((model[0].weight == 0).sum()) == 0.75 * 16 * 32
    prune_(model := nn.Sequential(nn.Linear(16, 8)), NM(2, 4))
    assert torch.equal((model[0].weight != 0).view(8, 4, 4).sum(-1), torch.full((8, 4), 2))


def test_the_cli_builds_language_model_configs_only_for_a_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from compile_toolkit.llm.wrap import CausalLMLogits

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    lm = CausalLMLogits(LlamaForCausalLM(config))
    assert cli_options("--method", "wanda", "--pattern", "2:4").config(lm) == Wanda(0.5, "2:4")
    assert cli_options("--structure", "query_head", "--sparsity", "0.5").config(lm) == DecoderStructures(
        "query_head", 0.5, "activation", False)
    assert cli_options("--structure", "neuron").config(lm) == DecoderStructures("neuron", 0.5, "activation", False)
    assert cli_options("--structure", "neuron", "--importance", "l2").config(lm) == Channels(0.5, "neuron", "l2")
    with pytest.raises(CtkError, match="--method wanda prunes the decoder layers .* ConvBN is not one"):
        cli_options("--method", "wanda").config(ConvBN())
    tokens = [torch.randint(0, 64, (2, 8))]
    before = zeros(lm)
    pruned = prune_(lm, DecoderStructures("neuron", 0.5), PruneData(tokens=tokens))
    assert zeros(lm) > before and all(name.startswith("model.") for name in pruned.masks)


def test_a_config_without_what_it_needs_is_refused_before_any_work():
    model = ConvBN()
    assert needs(Channels()) == ("example_inputs",) and needs(Magnitude()) == ()
    with pytest.raises(CtkError, match="Channels pruning needs example_inputs"):
        prune_(model, Channels())
    with pytest.raises(CtkError, match="DecoderStructures pruning needs tokens"):
        prune_(model, DecoderStructures())
    with pytest.raises(CtkError, match="no pruner for str"):
        prune_(model, "magnitude")  # type: ignore[arg-type]
    assert zeros(model) == 0


@pytest.mark.parametrize(("flags", "recipe"), [
    (["--method", "wanda", "--pattern", "2:4"], "method: wanda\npattern: '2:4'\nschedule: {}\n"),
    (["--method", "sparsegpt", "--sparsity", "0.5"], "method: sparsegpt\nschedule: {final_sparsity: 0.5}\n"),
    (["--structure", "head", "--sparsity", "0.5"],
     "method: structured\nstructure: head\nimportance: activation\nschedule: {final_sparsity: 0.5}\n"),
    (["--structure", "block", "--sparsity", "0.5"], "method: structured\nstructure: block\nschedule: {final_sparsity: 0.5}\n"),
    (["--method", "magnitude", "--sparsity", "0.5"], "method: magnitude\nscope: decoder\nschedule: {final_sparsity: 0.5}\n"),
    (["--method", "magnitude", "--pattern", "2:4"], "method: '2:4'\nscope: decoder\nschedule: {}\n"),
], ids=["wanda-2:4", "sparsegpt", "head", "block", "magnitude", "magnitude-2:4"])
def test_ctk_prune_by_options_and_by_recipe_writes_the_same_masks_on_a_language_model(tmp_path, capsys, flags, recipe):
    """The language-model configs from a recipe file: `ctk prune --recipe` calibrates on the same
    text and writes the masks `ctk prune --method/--structure` writes."""
    from safetensors.torch import load_file
    from test_cli import run_cli
    from test_workloads import SEQ, corpus_txt, llama_lm

    model, corpus = llama_lm(tmp_path / "llama"), corpus_txt(tmp_path / "corpus.txt")
    (tmp_path / "recipe.yaml").write_text(recipe)
    common = ["prune", "--model", f"hf:{model}", "--data", str(corpus), "--seq-len", str(SEQ)]
    masks = []
    for how, out in ((flags, "by_options"), (["--recipe", str(tmp_path / "recipe.yaml")], "by_recipe")):
        status, err = run_cli([*common, *how, "--out", str(tmp_path / out)], capsys)
        assert status == 0, err
        masks.append(load_file(tmp_path / out / "masks.safetensors"))
    assert same_masks(*masks) and any((~m).any() for m in masks[0].values())


def test_a_language_model_recipe_is_checked_when_loaded():
    cases = [({"method": "structured", "structure": "block", "importance": "l1"}, "importance of structure 'block' "
              "must be influence"),
             ({"method": "wanda", "finetune": {"epochs": 2}}, "finetune.epochs does not apply to language-model"),
             ({"method": "magnitude", "scope": "decoder", "ignore": ["x"]}, "scope decoder prunes every linear"),
             ({"method": "structured", "structure": "channel", "importance": "activation"},
              "structure must be one of neuron, attention_head, query_head, head, block"),
             ({"method": "wanda", "pattern": "4:2"}, "pattern must be N:M with 0 < N < M, got '4:2'"),
             ({"method": "wanda", "scope": "global"}, "scope is not a field here")]
    for fields, message in cases:
        with pytest.raises(CtkError, match=message):
            recipe_from_dict({"schedule": {"final_sparsity": 0.5}, **fields})
