import atexit
import os
import shutil
import tempfile

import pytest
import torch

# One core per test process. `make test` runs one pytest worker per core; a second thread in
# each (torch's OpenMP pool, ONNX Runtime's, XLA's Eigen pool), or in the processes a test starts
# (`ctk` jobs, torchrun ranks, the StableHLO worker, which inherit this environment), oversubscribes
# the cores, and spin-waiting threads then make a forward pass 3 to 100 times slower (measured: the
# main job 36 s alone, 432 s beside a second worker at two threads each).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
torch.set_num_threads(1)
# Latency tables measured by --target-speedup jobs go to a folder of this test process, not the
# user's cache (timed at one thread on a loaded machine, they are not this machine's table).
if "CTK_CACHE_DIR" not in os.environ:
    os.environ["CTK_CACHE_DIR"] = tempfile.mkdtemp(prefix="ctk-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CTK_CACHE_DIR"], ignore_errors=True)


def rel_error(reference, candidate) -> float:
    """max |a - b| / max |a| (in double precision) over a tensor or a tuple of tensors: the tests'
    one measure of how far a rewritten model is from its reference."""
    if isinstance(reference, torch.Tensor):
        return ((reference.double() - candidate.double()).abs().max() / reference.abs().max()).item()
    return max(rel_error(a, b) for a, b in zip(reference, candidate, strict=True))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The modules whose tests take longest (each 15-70 s: torchvision transformers through every
# exporter, the strip fuzz, multi-rank torchrun jobs). Collected last by name, they ran at the end
# of one worker's share, and the other worker, out of tests, waited for the last of them; run
# first, the short tests fill the end of both workers' time.
LONGEST_FIRST = ("test_zoo.py", "test_fuzz_strip.py", "test_tp.py", "test_fsdp.py", "test_target_speedup.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order otherwise
