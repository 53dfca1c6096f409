"""XLA SPMD training on 4 virtual CPU devices computes what plain training on one CPU computes.

The reference is ``--strategy single`` in this process (eager PyTorch on the CPU). Every SPMD run
happens in one subprocess (``PJRT_DEVICE=CPU CPU_NUM_DEVICES=4``), because ``xr.use_spmd()``
cannot be undone and some XLA failures abort the process; that subprocess is this file run as a
script. It trains on a 2x2 mesh, a 4x1 mesh, a 2x2 mesh with FSDPv2, and resumes the 2x2 run's
mid-run checkpoint on a 4x1 mesh, and runs ``ctk train --strategy spmd --mesh 2x2`` through the
CLI; it writes losses, final weights, masks and the shardings the runs logged.

The model is small but has what the sharding rules split: a convolution (output channels on
``model``) and a Megatron pair of linears (column-, then row-parallel), plus a batch norm, whose
statistics over a batch split on ``data`` must still be those of the global batch.

Tolerances: losses and weights within 1e-5 absolute (float32 with reductions split differently
across devices, over 8 SGD steps; measured 5e-7 and 3e-8); masks exactly equal. One difference
is torch_xla's, not SPMD's: its batch norm updates ``running_var`` with the biased batch variance
where eager PyTorch uses the unbiased one (a factor ``n / (n - 1)``, n = 4096 values per channel
per batch here; the statistics re-estimated after pruning average the batches' variances), so
running variances are compared to eager with a relative tolerance and tightly across meshes.
The XLA flags below make the CPU compiler about 8x faster on a loaded machine (less
optimisation, same operations); the results stay within the tolerances above.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compile_toolkit.errors import CtkError
from compile_toolkit.training.config import TrainConfig
from compile_toolkit.training.mesh import MeshShape, parse_mesh, tensor_parallel_specs

THIS = Path(__file__).resolve()
STEPS = 8
RESUME_STEP = 4
ATOL = 1e-5
RUNNING_VAR_RTOL = 5e-4  # eager vs XLA unbiasing, see above: 1 / 4095 = 2.4e-4 after the re-estimate
MESHES = ("2x2", "4x1", "fsdp-2x2")
FAST_XLA_CPU = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT_S = 400
# On a 2x2 mesh the ``model`` axis is the inner one: devices (0,1) and (2,3) share a data shard,
# so a weight split on dim 0 over ``model`` and replicated over ``data`` reads as below.
ROW_SPLIT_2X2 = "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}"
COLUMN_SPLIT_2X2 = "{devices=[1,2,2]0,2,1,3 last_tile_dim_replicate}"
CONV_SPLIT_2X2 = "{devices=[2,1,1,1,2]0,2,1,3 last_tile_dim_replicate}"
FSDP_SPLIT_2X2 = "{devices=[2,2]0,1,2,3 last_tile_dim_replicate}"  # a vector split on the outer (fsdp) axis


def digits_net() -> nn.Module:
    """conv 1->4 (8x8) + batch norm, flatten 256, linear 256->32, linear 32->10: what every run trains."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def _config(**options) -> TrainConfig:
    return TrainConfig(
        model=f"{THIS}:digits_net", max_steps=STEPS, batch_size=64, lr=0.05, final_sparsity=0.5,
        prune_frequency=2, checkpoint_every=RESUME_STEP, **options,
    )


# ---- the SPMD side (this file run as a script, in the subprocess) ---------------------------------

def _spmd_runs(work: Path) -> None:
    from compile_toolkit.cli import main
    from compile_toolkit.training.spmd import train_spmd

    def run(name: str, **options) -> None:
        result = train_spmd(_config(strategy="spmd", log_dir=str(work / f"log-{name}"), **options))
        meta = json.loads((work / f"log-{name}" / "metrics.json").read_text())["meta"]
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(work / f"{name}-model.safetensors"))
        save_file(result.masks, str(work / f"{name}-masks.safetensors"))
        (work / f"{name}.json").write_text(json.dumps({"losses": result.losses, "shardings": meta["shardings"],
                                                       "resumed_from": result.resumed_from,
                                                       "samples_per_s": result.samples_per_s}))

    run("2x2", mesh="2x2", checkpoint_dir=str(work / "ckpt-2x2"))
    run("4x1", mesh="4x1")
    run("fsdp-2x2", mesh="2x2", fsdp=True)
    resume = work / "resume"
    resume.mkdir()
    step_dir = f"step-{RESUME_STEP:08d}"
    shutil.copytree(work / "ckpt-2x2" / step_dir, resume / step_dir)
    (resume / "latest").write_text(step_dir + "\n")
    run("resume-4x1", mesh="4x1", checkpoint_dir=str(resume), resume=True)
    cli_log = work / "log-cli"
    code = main(["train", "--strategy", "spmd", "--mesh", "2x2", "--model", f"{THIS}:digits_net",
                 "--max-steps", str(STEPS), "--batch-size", "64", "--lr", "0.05", "--sparsity", "0.5",
                 "--prune-frequency", "2", "--log-dir", str(cli_log)])
    (work / "cli.json").write_text(json.dumps({"code": code, "log": json.loads((cli_log / "metrics.json").read_text())}))
    try:
        train_spmd(_config(strategy="spmd", mesh="2x1"))
    except CtkError as error:
        (work / "bad-mesh.txt").write_text(str(error))


# ---- the tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference() -> dict:
    from compile_toolkit.training.trainer import train

    result = train(_config(strategy="single"))
    return {"losses": result.losses, "model": result.model.state_dict(), "masks": result.masks}


@pytest.fixture(scope="module")
def spmd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch_xla")  # an optional extra of the package (pinned in the dev environment)
    work = tmp_path_factory.mktemp("spmd")
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", XLA_FLAGS=FAST_XLA_CPU)
    env.pop("XLA_USE_SPMD", None)
    done = subprocess.run([sys.executable, str(THIS), str(work)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=THIS.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def _run(work: Path, name: str) -> dict:
    info = json.loads((work / f"{name}.json").read_text())
    info["model"] = load_file(str(work / f"{name}-model.safetensors"))
    info["masks"] = load_file(str(work / f"{name}-masks.safetensors"))
    return info


def _assert_same_training(run: dict, reference: dict, first_step: int = 0) -> None:
    assert len(run["losses"]) == STEPS - first_step
    assert run["losses"] == pytest.approx(reference["losses"][first_step:], abs=ATOL)
    assert run["model"].keys() == reference["model"].keys()
    for name, weight in reference["model"].items():
        if name.endswith("running_var"):
            torch.testing.assert_close(run["model"][name], weight, atol=0, rtol=RUNNING_VAR_RTOL, msg=name)
        else:
            torch.testing.assert_close(run["model"][name], weight, atol=ATOL, rtol=0, msg=name)
    assert run["masks"].keys() == reference["masks"].keys()
    for name, mask in reference["masks"].items():
        assert torch.equal(run["masks"][name], mask), name
    sparsity = sum(int((~m).sum()) for m in reference["masks"].values()) / sum(m.numel() for m in reference["masks"].values())
    assert sparsity == pytest.approx(0.5, abs=0.01)  # the schedule really pruned during these steps


@pytest.mark.parametrize("name", MESHES)
def test_spmd_matches_one_device(spmd: Path, reference: dict, name: str) -> None:
    _assert_same_training(_run(spmd, name), reference)


def test_meshes_agree_on_batch_norm_statistics(spmd: Path) -> None:
    """A batch split over devices still gives global-batch statistics: every mesh, the same."""
    first, *others = (_run(spmd, name)["model"] for name in MESHES)
    for other in others:
        for name in ("1.running_mean", "1.running_var"):
            torch.testing.assert_close(other[name], first[name], atol=1e-6, rtol=0, msg=name)


def test_resume_on_another_mesh(spmd: Path, reference: dict) -> None:
    """The 2x2 run's step-4 checkpoint, resumed on 4x1, ends where the uninterrupted run ends."""
    resumed = _run(spmd, "resume-4x1")
    assert resumed["resumed_from"] == RESUME_STEP
    _assert_same_training(resumed, reference, first_step=RESUME_STEP)


def test_weights_are_sharded(spmd: Path) -> None:
    tensor_parallel = _run(spmd, "2x2")["shardings"]
    assert tensor_parallel["0.weight"] == CONV_SPLIT_2X2
    assert tensor_parallel["1.weight"] == "{replicated}"  # batch norm: replicated, yet global-batch statistics
    assert tensor_parallel["4.weight"] == ROW_SPLIT_2X2  # fc1 column parallel: output features split
    assert tensor_parallel["6.weight"] == COLUMN_SPLIT_2X2  # fc2 row parallel: input features split
    assert tensor_parallel["6.bias"] == "{replicated}"
    assert set(_run(spmd, "4x1")["shardings"].values()) == {"{replicated}"}  # a model axis of 1 splits nothing
    fsdp = _run(spmd, "fsdp-2x2")["shardings"]
    assert fsdp["4.weight"] == ROW_SPLIT_2X2  # tensor parallel first, FSDPv2 leaves it
    for name in ("1.weight", "6.bias"):  # left whole by tensor parallelism, split along fsdp by FSDPv2
        assert fsdp[name] == FSDP_SPLIT_2X2, name


def test_ctk_train_spmd(spmd: Path, reference: dict) -> None:
    """``ctk train --strategy spmd --mesh 2x2`` is the same run as the API call."""
    cli = json.loads((spmd / "cli.json").read_text())
    assert cli["code"] == 0
    assert cli["log"]["meta"]["mesh"] == "2x2" and cli["log"]["meta"]["devices"] == 4
    assert [entry["loss"] for entry in cli["log"]["steps"]] == pytest.approx(reference["losses"], abs=ATOL)


def test_mesh_must_cover_every_device(spmd: Path) -> None:
    message = (spmd / "bad-mesh.txt").read_text()
    assert "--mesh 2x1 needs 2 devices, the XLA runtime has 4" in message


def test_parse_mesh() -> None:
    assert parse_mesh("4x2") == MeshShape(4, 2)
    assert parse_mesh("1X8").devices == 8
    for bad in ("4", "0x2", "2x2x2", "axb", ""):
        with pytest.raises(CtkError, match="--mesh"):
            parse_mesh(bad)


def test_tensor_parallel_rules() -> None:
    """Megatron pairs, attention by heads, indivisible and non-matrix parameters left whole."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4)
            self.norm = nn.LayerNorm(16)
            self.up = nn.Linear(16, 64)
            self.down = nn.Linear(64, 16)
            self.head = nn.Linear(16, 5)

    specs = tensor_parallel_specs(Block(), 2)
    assert specs == {
        "attn.in_proj_weight": ("model", None),
        "attn.in_proj_bias": ("model",),
        "attn.out_proj.weight": (None, "model"),
        "up.weight": ("model", None),
        "up.bias": ("model",),
        "down.weight": (None, "model"),
    }
    assert tensor_parallel_specs(Block(), 1) == {}


def test_spmd_rejects_bad_options() -> None:
    from compile_toolkit.training.spmd import train_spmd

    with pytest.raises(CtkError, match="--batch-size 64 must be divisible by the data axis of --mesh 3x1"):
        train_spmd(_config(strategy="spmd", mesh="3x1"))
    with pytest.raises(CtkError, match="--sync-batchnorm"):
        train_spmd(_config(strategy="spmd", mesh="2x2", sync_batchnorm=True))


if __name__ == "__main__":
    _spmd_runs(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip torch_xla's slow interpreter teardown; everything is written
