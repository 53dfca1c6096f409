"""Channel pruning on an XLA device chooses the channels the CPU chooses, without a compile per update.

The number of channels an update removes grows at every update step of a gradual schedule; had
the choice run on the device, each update would be a new XLA graph (30-60 s each on a loaded
CPU). The subprocess (``PJRT_DEVICE=CPU``; this file run as a script) runs the schedule's updates
on the XLA device, with the weights changed between updates as training would, and records the
masks and XLA's compile count after each update; the test runs the same updates on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_structured_training import TinyResidual  # tests/ is on sys.path: pytest's rootdir, or this script's folder

from compile_toolkit.pruning import GradualSchedule, Sparsifier

THIS = Path(__file__).resolve()
SCHEDULE = GradualSchedule(final_sparsity=0.75, start_step=0, end_step=8, frequency=2)  # updates at 0 (sparsity 0), 2, 4, 6, 8
STEPS = 9
FAST_XLA_CPU = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run(device: torch.device, sync=lambda: None, compiles=lambda: 0) -> tuple[list[dict], list[int]]:
    """The schedule's updates on ``device``; weights scaled by a fixed random factor between steps."""
    torch.manual_seed(0)
    model = TinyResidual().eval()
    inputs = (torch.randn(2, 1, 8, 8),)
    factors = [{n: 1 + 0.5 * torch.rand_like(p) for n, p in model.named_parameters()} for _ in range(STEPS)]
    model.to(device)
    sparsifier = Sparsifier(model, SCHEDULE, method="channel", example_inputs=inputs)
    masks, counts = [], []
    for step in range(STEPS):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.mul_(factors[step][name].to(device))
        if sparsifier.update(step):
            sync()
            masks.append({n: m.cpu() for n, m in sparsifier.masks.items()})
            counts.append(compiles())
    return masks, counts


def _xla_side(work: Path) -> None:
    import torch_xla
    import torch_xla.debug.metrics as metrics

    def compiles() -> int:
        data = metrics.metric_data("CompileTime")
        return data[0] if data else 0

    masks, counts = _run(torch_xla.device(), torch_xla.sync, compiles)
    for k, step_masks in enumerate(masks):
        save_file(step_masks, str(work / f"masks-{k}.safetensors"))
    (work / "compiles.json").write_text(json.dumps(counts))


def test_xla_chooses_the_cpu_channels_and_compiles_once(tmp_path: Path) -> None:
    pytest.importorskip("torch_xla")
    env = dict(os.environ, PJRT_DEVICE="CPU", XLA_FLAGS=FAST_XLA_CPU)
    env.pop("XLA_USE_SPMD", None)
    env.pop("CPU_NUM_DEVICES", None)
    done = subprocess.run([sys.executable, str(THIS), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=400, cwd=THIS.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, _ = _run(torch.device("cpu"))
    assert len(expected) == 4  # every update step after the first (sparsity 0) pruned more
    for k, cpu_masks in enumerate(expected):
        xla_masks = load_file(str(tmp_path / f"masks-{k}.safetensors"))
        assert xla_masks.keys() == cpu_masks.keys()
        for name, mask in cpu_masks.items():
            assert torch.equal(xla_masks[name], mask), (k, name)
    counts = json.loads((tmp_path / "compiles.json").read_text())
    # The first two updates compile their graphs (mask merge and re-zeroing; weight changes); later
    # updates, each removing more channels, reuse them.
    assert counts[-1] == counts[1], counts


if __name__ == "__main__":
    _xla_side(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip torch_xla's slow interpreter teardown; everything is written
