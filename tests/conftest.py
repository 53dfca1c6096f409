import pytest
import torch


def rel_error(reference, candidate) -> float:
    """max |a - b| / max |a| (in double precision) over a tensor or a tuple of tensors: the tests'
    one measure of how far a rewritten model is from its reference."""
    if isinstance(reference, torch.Tensor):
        return ((reference.double() - candidate.double()).abs().max() / reference.abs().max()).item()
    return max(rel_error(a, b) for a, b in zip(reference, candidate, strict=True))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
