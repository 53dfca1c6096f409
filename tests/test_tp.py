"""Tensor parallelism for real: torchrun starts gloo workers on a 1x2 and a 2x2 mesh (TP, and TP
with FSDP2 on the data axis), each compared with one process on the same global batch, with N:M
masks computed on the split weights, and a CNN split by channels with channel-group masks; plans
derived from the model's graph and read from --tp-plan."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_fsdp import assert_same_training, log_of, torchrun
from torch import nn

from compile_toolkit.errors import CtkError
from compile_toolkit.training import TrainConfig, load_checkpoint, train
from compile_toolkit.training.tp_plan import derive_plan, read_plan

MLP = """
from torch import nn


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
"""
# Two convolution pairs (batch norm, ReLU and a max pool between the second), then a whole batch norm and head.
CNN = """
from torch import nn


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
"""
OPTIONS = dict(batch_size=256, max_steps=12, prune_frequency=2, checkpoint_every=4, lr=0.3, prune_method="2:4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp")
    (root / "mlp.py").write_text(MLP)
    spec = f"{root / 'mlp.py'}:mlp"
    return {"root": root, "spec": spec, "single": train(TrainConfig(model=spec, **OPTIONS))}


def test_tp_on_two_ranks_with_a_plan_file_trains_like_one_process(runs):
    root = runs["root"]
    plan = root / "plan.json"
    plan.write_text(json.dumps({"3": "colwise", "5": "rowwise"}))
    run = torchrun("tp", 2, runs["spec"], root / "tp", OPTIONS, ("--mesh", "1x2", "--tp-plan", str(plan)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ctk: tp: 1 layer(s) left replicated on the model axis (no column/row pair in --tp-plan): 1" in run.stderr
    assert_same_training(root / "tp", runs["single"])
    meta = log_of(root / "tp")["meta"]
    assert meta["mesh"] == "1x2" and meta["tp_plan"] == {"3": "colwise", "5": "rowwise"}
    assert meta["placements"]["3.weight"] == "S(0) local (8, 32)"
    assert meta["placements"]["5.weight"] == "S(1) local (10, 8)"
    assert meta["placements"]["1.weight"] == "replicated (32, 64)"
    assert meta["local_parameters"] == [2080 + 8 * 33 + 10 * 8 + 10] * 2


def test_tp_times_fsdp_on_a_two_by_two_mesh_trains_like_one_process(runs):
    root = runs["root"]
    run = torchrun("tp", 4, runs["spec"], root / "mesh", OPTIONS, ("--mesh", "2x2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "left replicated on the model axis (no column/row pair): 5" in run.stderr
    assert_same_training(root / "mesh", runs["single"])
    meta = log_of(root / "mesh")["meta"]
    assert meta["tp_plan"] == {"1": "colwise", "3": "rowwise"}
    # Linear(64, 32): rows split over the model axis (16) and again by FSDP2 over the data axis (8, strided).
    assert meta["placements"]["1.weight"] == "_S(0, 2), S(0) local (8, 64)"
    assert meta["placements"]["3.bias"] == "S(0), R local (8,)"
    assert meta["placements"]["5.weight"] == "S(0) local (5, 16)"  # on the data axis only
    # Over 4 ranks every parameter is held once, except those whole on the model axis (3.bias, layer 5): twice.
    assert sum(meta["local_parameters"]) == meta["parameters"] + 16 + 16 * 10 + 10

    # Its step-8 checkpoint (TP x FSDP2 shards of 4 ranks) resumed as TP alone on 2: the same end.
    moved = root / "remeshed"
    (moved / "ckpt").mkdir(parents=True)
    shutil.copytree(root / "mesh" / "ckpt" / "step-00000008", moved / "ckpt" / "step-00000008")
    (moved / "ckpt" / "latest").write_text("step-00000008\n")
    resumed = torchrun("tp", 2, runs["spec"], moved, OPTIONS, ("--mesh", "1x2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 8" in resumed.stdout
    saved = load_checkpoint(moved / "ckpt")
    assert saved.step == 12 and saved.meta["mesh"] == "1x2"
    for name, tensor in runs["single"].model.state_dict().items():
        torch.testing.assert_close(saved.model_state[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert all(torch.equal(saved.sparsifier_state["masks"][n], m) for n, m in runs["single"].masks.items())


def test_plans_from_the_graph_and_bad_plan_files(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16),
                          nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(8, 4))
    # The LayerNorm mixes features: 6 and 7 are a pair, 4 is not the partner of 6.
    assert derive_plan(model, 2) == {"1": "colwise", "4": "rowwise", "6": "colwise", "7": "rowwise"}
    assert derive_plan(model, 16) == {"1": "colwise", "4": "rowwise"}  # 8 hidden features do not split 16 ways
    cases = [
        ("{}", "must be a JSON object"),
        ("[1", "is not valid JSON"),
        ('{"fc9": "colwise"}', "Sequential has no module 'fc9'; its linear and convolution layers are 1, 4, 6, 7"),
        ('{"1": "columns"}', "module '1' has style 'columns'; valid: colwise, rowwise, channelwise"),
        ('{"5": "colwise"}', "module '5' is a LayerNorm; colwise and rowwise split nn.Linear layers and convolutions"),
        ('{"7": "colwise"}', "module '7' has 4 output features, not divisible by the 8 ranks of the model axis"),
    ]
    path = assert_plan_errors(tmp_path, model, 8, cases)
    with pytest.raises(CtkError, match="no such file"):
        read_plan(str(tmp_path / "nowhere.json"), model, 2)
    path.write_text('{"6": "rowwise"}')
    assert read_plan(str(path), model, 2) == {"6": "rowwise"}


def test_convolution_plans_from_the_graph_and_bad_plan_files(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.SiLU(),
                          nn.Conv2d(6, 4, 1), nn.Conv2d(4, 4, 1))
    # A grouped convolution ties input to output channels: 0 has no partner, 4 is never split.
    assert derive_plan(model, 2) == {"5": "colwise", "6": "channelwise", "8": "rowwise"}
    assert derive_plan(model, 4) == {"8": "colwise", "9": "rowwise"}  # 6 channels do not split 4 ways
    cases = [
        ('{"4": "colwise"}', "module '4' is a grouped (groups=2) Conv2d; only convolutions of one group split"),
        ('{"5": "colwise"}', "module '5' has 6 output channels, not divisible by the 4 ranks of the model axis"),
        ('{"6": "channelwise"}', "module '6' has 6 channels, not divisible by the 4 ranks of the model axis"),
        ('{"6": "colwise"}', "module '6' is a BatchNorm2d; colwise and rowwise split nn.Linear layers and"),
        ('{"7": "channelwise"}', "module '7' is a SiLU; channelwise splits batch norms"),
    ]
    path = assert_plan_errors(tmp_path, model, 4, cases)
    path.write_text('{"0": "colwise", "1": "channelwise", "9": "rowwise"}')
    assert read_plan(str(path), model, 4) == {"0": "colwise", "1": "channelwise", "9": "rowwise"}


def test_tp_splits_a_cnn_by_channels_with_channel_group_masks_like_one_process(tmp_path):
    """Convolutions by output then input channels, the batch norms between them by channel (running
    statistics too): the losses, weights, statistics and channel-group masks of one process."""
    (tmp_path / "cnn.py").write_text(CNN)
    spec = f"{tmp_path / 'cnn.py'}:cnn"
    options = dict(batch_size=256, max_steps=6, prune_frequency=2, checkpoint_every=6, lr=0.3, prune_method="channel")
    single = train(TrainConfig(model=spec, evaluate=False, **options))
    run = torchrun("tp", 2, spec, tmp_path / "tp", options, ("--mesh", "1x2", "--no-eval"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "left replicated on the model axis (no column/row pair): 13" in run.stderr
    assert_same_training(tmp_path / "tp", single)
    meta = log_of(tmp_path / "tp")["meta"]
    assert meta["tp_plan"] == {"0": "colwise", "1": "channelwise", "3": "rowwise",
                               "6": "colwise", "7": "channelwise", "10": "rowwise"}
    placements = meta["placements"]
    assert placements["0.weight"] == "S(0) local (4, 1, 3, 3)" and placements["0.bias"] == "S(0) local (4,)"
    assert placements["1.weight"] == "S(0) local (4,)"
    assert placements["3.weight"] == "S(1) local (16, 4, 3, 3)" and placements["3.bias"] == "R local (16,)"
    assert placements["10.weight"] == "S(1) local (8, 8, 3, 3)" and placements["4.weight"] == "replicated (16,)"
    # Held whole: the row-split biases (16, 8), batch norm 4 (32) and the head (1290); the rest halved.
    assert meta["local_parameters"] == [1346 + (meta["parameters"] - 1346) // 2] * 2


def test_tp_splits_llama_attention_by_key_value_groups_like_one_process(tmp_path):
    """A transformers Llama (4 heads, 2 key/value groups) on 2 ranks, from the model's own plan: q/k/v
    split by heads, o_proj by input features, the gated MLP column/row; lm_head stays whole."""
    from test_workloads import corpus_txt, llama_lm

    from compile_toolkit.workload import load_workload

    model, text = llama_lm(tmp_path / "llama"), corpus_txt(tmp_path / "corpus.txt")
    options = dict(data=str(text), seq_len=16, batch_size=8, max_steps=6, prune_frequency=2, evaluate=False,
                   checkpoint_every=6)
    loaded, _ = load_workload(f"hf:{model}", str(text), None, None, 8, None, seq_len=16)
    layer = "model.model.layers.0"
    plan = derive_plan(loaded.module, 2)
    assert len(plan) == 14 and plan[f"{layer}.self_attn.k_proj"] == "colwise"
    assert plan[f"{layer}.self_attn.o_proj"] == plan[f"{layer}.mlp.down_proj"] == "rowwise"
    # 4 ranks do not divide 2 key/value groups: attention stays whole, the MLPs still split.
    assert sorted(derive_plan(loaded.module, 4)) == sorted(n for n in plan if ".mlp." in n)
    single = train(TrainConfig(model=f"hf:{model}", **options))
    run = torchrun("tp", 2, f"hf:{model}", tmp_path / "tp", {k: v for k, v in options.items() if k != "evaluate"},
                   ("--no-eval",))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "left replicated on the model axis (no column/row pair): model.lm_head" in run.stderr
    assert_same_training(tmp_path / "tp", single)
    meta = log_of(tmp_path / "tp")["meta"]
    assert meta["placements"][f"{layer}.self_attn.k_proj.weight"] == "S(0) local (8, 32)"  # 1 of 2 groups of 8
    assert meta["local_parameters"][0] < 0.6 * meta["parameters"]


def assert_plan_errors(tmp_path: Path, model: nn.Module, size: int, cases: list[tuple[str, str]]) -> Path:
    """Each ``(plan file text, message)`` is refused by ``read_plan`` with that message; returns the file."""
    path = tmp_path / "plan.json"
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(CtkError, match=re.escape(message)):
            read_plan(str(path), model, size)
    return path
