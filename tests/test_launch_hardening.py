"""Launcher and worker hardening (issue 20: 18, 19, 20, 24, 25 and two cosmetic points).

What the launcher of ``ctk train --nproc-per-node`` checks before any worker starts (the mesh, how
the batch splits, a ``--tp-plan`` run on the model's shapes), what the workers tell each other when
one builds a different model or none, SIGTERM, two machines (two agents on this one), and a worker
that fails while nobody reads its stderr. Launches are few and small: each costs 10-30 s here.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_ddp import TINY_MODEL, _flags
from test_fsdp import assert_same_training

from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.training import TrainConfig, train
from compile_toolkit.training.launch import Nodes, check_launch
from compile_toolkit.training.tp_check import check_plan_shapes
from compile_toolkit.training.tp_plan import derive_plan

TIMEOUT = 180
FACTORIES = TINY_MODEL + '''

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                         nn.Flatten(), nn.Linear(256, 10))


def flaky():
    """Rank 1 fails on the first attempt and builds a wider hidden layer on the second."""
    import os

    if os.environ["RANK"] == "1":
        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            raise RuntimeError("no GPU memory left on rank 1")
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))


def marked():
    """tiny(), after leaving this worker's pid in $MARK_DIR (the test waits for the workers that way)."""
    import os
    from pathlib import Path

    Path(os.environ["MARK_DIR"], str(os.getpid())).write_text("")
    return tiny()
'''
OPTIONS = dict(batch_size=256, max_steps=8, prune_frequency=2, checkpoint_every=4, sync_batchnorm=True)


@pytest.fixture(scope="module")
def factories(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("launch")
    (folder / "models.py").write_text(FACTORIES)
    return str(folder / "models.py")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without fault injection or an XLA device choice, temporary files in ``tmp``."""
    tmp.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTK_") and k != "PJRT_DEVICE"}
    return {**clean, "TMPDIR": str(tmp), **extra}


def _ctk(*argv: str) -> list[str]:
    return [sys.executable, "-m", "compile_toolkit", "train", *argv]


def _agent_leftovers(tmp: Path) -> list[str]:
    return [path.name for path in tmp.iterdir() if "torchelastic" in path.name]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_mesh_is_bounded_in_one_line():
    for mesh in ("99999999999999999999x1", "300x300", "1" + "0" * 5000 + "x1"):
        with pytest.raises(CtkError, match=r"^--mesh must span at most 65536 devices \(DATA\*MODEL\), got '"):
            TrainConfig(strategy="spmd", mesh=mesh).validate()
    TrainConfig(strategy="spmd", mesh="256x256").validate()  # the largest mesh


@pytest.mark.parametrize(("argv", "message"), [
    (["--strategy", "tp", "--mesh", "2x2"], "--mesh 2x2 needs 4 processes, --nproc-per-node 2 starts 2"),
    (["--strategy", "tp", "--mesh", "2x1", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"],
     "--mesh 2x1 needs 2 processes, --nproc-per-node 2 on --nnodes 2 machines start 4"),
    (["--strategy", "ddp", "--batch-size", "63"], "--batch-size 63 (the global batch) must be divisible by the 2 "
     "processes"),
    (["--strategy", "tp", "--mesh", "2x1", "--batch-size", "63"], "--batch-size 63 (the global batch) must be "
     "divisible by the 2 ranks of the data axis"),
    (["--strategy", "tp", "--model", "{factories}:mlp", "--tp-plan", "{plan}"], "--tp-plan {plan} does not fit "
     "Sequential split over 2 ranks: the forward fails in '3' (Linear) with RuntimeError: a and b must have same "
     "reduction dim, but got [2, 16] X [32, 16]; each colwise layer's output must reach its rowwise partner through "
     "operations on each feature or channel alone"),
    (["--strategy", "ddp", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT, an address every machine "
     "reaches (docs/ddp.md)"),
    (["--strategy", "ddp", "--nnodes", "2", "--node-rank", "2"], "--node-rank must be <= 1, got 2"),
    (["--strategy", "ddp", "--rdzv-endpoint", "host"],
     "--rdzv-endpoint must be HOST:PORT (a port 1-65535), got 'host'"),
])
def test_the_launcher_refuses_what_every_worker_would_before_starting_them(argv, message, factories, tmp_path, capsys):
    """Each of these started two workers that failed alike (tracebacks from both), or started none
    with a traceback of torchrun's; now one line from the launcher."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"1": "colwise", "5": "rowwise"}))  # 3 between them gets 16 of 32 features
    argv = [arg.format(factories=factories, plan=plan) for arg in argv]
    assert main(["train", "--nproc-per-node", "2", *argv]) == 1
    assert capsys.readouterr().err == f"ctk: error: {message.format(plan=plan)}\n"


def test_plans_that_pair_up_pass_the_launcher_and_broken_pairs_are_named(factories, tmp_path):
    plan = tmp_path / "plan.json"
    for model, good in (("mlp", {"3": "colwise", "5": "rowwise"}),
                        ("cnn", {"0": "colwise", "1": "channelwise", "3": "rowwise"})):
        plan.write_text(json.dumps(good))
        check_launch(TrainConfig(strategy="tp", model=f"{factories}:{model}", tp_plan=str(plan)), 2, 0, Nodes())
    plan.write_text(json.dumps({"0": "colwise", "3": "rowwise"}))  # the batch norm between them left whole
    with pytest.raises(CtkError, match=r"fails in '1' \(BatchNorm2d\) with RuntimeError: running_mean should contain "
                       "4 elements not 8"):
        check_launch(TrainConfig(strategy="tp", model=f"{factories}:cnn", tp_plan=str(plan)), 2, 0, Nodes())
    with pytest.raises(CtkError, match="--nproc-per-node starts torchrun workers: use --strategy ddp, fsdp or tp"):
        check_launch(TrainConfig(), 2, 0, Nodes())


def test_a_transformers_plan_is_checked_in_the_launcher_without_xla_noise(tmp_path):
    """A Llama plan splitting the MLP's up projection but not its gate: one line naming the MLP from
    the launcher (no worker's traceback), no ``Defaulting to PJRT_DEVICE=CPU`` from the torch_xla that
    transformers imports. The plan transformers declares (attention by heads) passes the same check."""
    from test_workloads import corpus_txt, llama_lm

    from compile_toolkit.workload import load_workload

    model, text = llama_lm(tmp_path / "llama"), corpus_txt(tmp_path / "corpus.txt")
    loaded, workload = load_workload(f"hf:{model}", str(text), None, None, 8, None, seq_len=16)
    batch = next(iter(torch.utils.data.DataLoader(workload.splits.val, batch_size=2)))
    check_plan_shapes(loaded.module, derive_plan(loaded.module, 2), 2, ((), {k: v for k, v in batch.items()
                                                                             if k != "labels"}), "plan")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.model.layers.0.mlp.up_proj": "colwise"}))
    run = subprocess.run(_ctk("--nproc-per-node", "2", "--strategy", "tp", "--model", f"hf:{model}", "--data",
                              str(text), "--seq-len", "16", "--batch-size", "8", "--tp-plan", str(plan)),
                         capture_output=True, text=True, timeout=TIMEOUT, env=_env(tmp_path / "tmp"))
    assert run.returncode == 1
    last = run.stderr.splitlines()[-1]  # after the progress bars of datasets and transformers
    assert last.startswith(f"ctk: error: --tp-plan {plan} does not fit CausalLMLogits split over 2 ranks: the "
                           "forward fails in 'model.model.layers.0.mlp' (LlamaMLP) with RuntimeError: Attempting to "
                           "broadcast a dimension of length 32 at -1!")
    assert "PJRT" not in run.stderr and "Traceback" not in run.stderr and "[rank" not in run.stderr


def test_spmd_option_errors_come_before_xla_is_imported(tmp_path):
    run = subprocess.run(_ctk("--strategy", "spmd", "--mesh", "3x1"), capture_output=True, text=True,
                         timeout=TIMEOUT, env=_env(tmp_path / "tmp"))
    assert (run.returncode, run.stderr) == (1, "ctk: error: --batch-size 64 must be divisible by the data axis of "
                                               "--mesh 3x1\n")


def test_a_rank_whose_factory_fails_or_builds_another_width_is_named_on_every_rank(factories, tmp_path):
    """Attempt 0: rank 1's factory raises; attempt 1 (a restart): it builds 16 hidden features where
    rank 0 builds 8. Both ranks say which rank and why, in one line each, before any collective
    that would have died of "Connection closed by peer"; the agent's folder goes with the run."""
    run = subprocess.run(_ctk("--nproc-per-node", "2", "--max-restarts", "1", "--strategy", "ddp", "--model",
                              f"{factories}:flaky", "--batch-size", "64", "--max-steps", "2"),
                         capture_output=True, text=True, timeout=TIMEOUT, env=_env(tmp_path / "tmp"))
    assert run.returncode == 1
    factory = f"factory 'flaky' in {factories} failed: RuntimeError: no GPU memory left on rank 1"
    assert f"ctk: error: {factory}\n" in run.stderr  # rank 1's own error
    assert f"ctk: error: rank 1 could not build --model '{factories}:flaky': {factory}\n" in run.stderr  # rank 0's
    assert run.stderr.count(f"ctk: error: rank 1 built another model than rank 0 from --model '{factories}:flaky' "
                            "('1.weight' is [8, 64] float32 on rank 0, [16, 64] float32 on rank 1); every rank must "
                            "build the same model\n") == 2
    assert "ctk: error: training workers failed after 1 restart(s)" in run.stderr
    assert "Traceback" not in run.stderr and "Connection closed" not in run.stderr
    assert _agent_leftovers(tmp_path / "tmp") == []


def test_sigterm_stops_the_workers_and_exits_143(factories, tmp_path):
    marks, tmp = tmp_path / "marks", tmp_path / "tmp"
    marks.mkdir()
    command = _ctk("--nproc-per-node", "2", "--strategy", "ddp", "--model", f"{factories}:marked", "--epochs", "1000",
                   "--no-eval")
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=_env(tmp, MARK_DIR=str(marks))) as ctk:
        deadline = time.monotonic() + TIMEOUT
        while len(list(marks.iterdir())) < 2 and ctk.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(path.name) for path in marks.iterdir()]
        assert len(workers) == 2 and ctk.poll() is None
        ctk.send_signal(signal.SIGTERM)
        stderr = ctk.communicate(timeout=60)[1]
    assert ctk.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.endswith("ctk: terminated\n") and "Traceback" not in stderr and "SignalException" not in stderr
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _agent_leftovers(tmp) == []


def test_two_machines_of_one_process_each_train_like_one_process(factories, tmp_path):
    """Two agents on this machine as two nodes, for DDP (c10d rendezvous on 127.0.0.1) and at the same
    time for FSDP2 (static rendezvous, node ranks given): global ranks 0 and 1, local rank 0 on both.
    ``ctk train --nnodes`` passes the rendezvous to torchrun; each run equals one process (losses,
    weights, masks), and only rank 0 printed the summary."""
    single = train(TrainConfig(model=f"{factories}:tiny", **OPTIONS, evaluate=False))
    runs = {strategy: (tmp_path / strategy, f"127.0.0.1:{_free_port()}", backend)
            for strategy, backend in (("ddp", "c10d"), ("fsdp", "static"))}
    agents = {(strategy, rank): subprocess.Popen(
        _ctk("--nproc-per-node", "1", "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint,
             "--rdzv-backend", backend, "--strategy", strategy, "--model", f"{factories}:tiny", *_flags(OPTIONS),
             "--no-eval", "--checkpoint-dir", str(folder / "ckpt"), "--log-dir", str(folder / "log")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path / "tmp"))
        for strategy, (folder, endpoint, backend) in runs.items() for rank in (0, 1)}
    outputs = {key: agent.communicate(timeout=TIMEOUT) for key, agent in agents.items()}
    for key, agent in agents.items():
        assert agent.returncode == 0, (key, outputs[key][1][-3000:])
    for strategy, (folder, _, _) in runs.items():
        summaries = [outputs[strategy, rank][0].count(f"({strategy}, 2 process(es))") for rank in (0, 1)]
        assert sorted(summaries) == [0, 1], strategy
        assert_same_training(folder, single)
    assert _agent_leftovers(tmp_path / "tmp") == []


def test_a_failing_worker_exits_even_when_nobody_reads_its_stderr(tmp_path):
    """A worker's stderr is a pipe that is full and never read (the reader has stopped): its error
    cannot be written, and it exits within the time limit instead of blocking in ``print``. The same
    failure with a reader shows the one error line."""
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(writer, False)
    try:
        while os.write(writer, b"x" * 4096):
            pass
    except BlockingIOError:
        pass
    os.set_blocking(writer, True)
    command = _ctk("--strategy", "ddp", "--model", str(tmp_path / "missing.py:f"))
    started = time.monotonic()
    blocked = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=writer, env=_worker_env(tmp_path))
    os.close(writer)
    read = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_worker_env(tmp_path))
    try:
        assert blocked.wait(timeout=60) == 1
    finally:
        blocked.kill()
        os.close(reader)
    assert time.monotonic() - started < 60
    assert (read.returncode, read.stderr) == (1, f"ctk: error: model file not found: {tmp_path / 'missing.py'}\n")


def _worker_env(tmp_path: Path) -> dict[str, str]:
    """What torchrun gives the one worker of a one-process run (its own store port)."""
    return _env(tmp_path / "tmp", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))
