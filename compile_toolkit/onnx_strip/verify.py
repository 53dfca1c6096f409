"""Checks that a stripped ONNX file computes what its input file computed, in ONNX Runtime.

Sample inputs are built from the graph's own input types: seeded normal floats, integer ids
below the size of the tables they index (``Gather`` on a constant), random booleans; a symbolic
dimension (batch, sequence) is given a small size. Outputs are compared with the PyTorch
verifier's rule (:func:`compile_toolkit.passes.verify.relative_error`: largest difference over
the largest output, a NaN or infinity the reference lacks fails). The tolerance follows the
precision the graph computes in (:func:`default_rtol`): a strip removes only exact zeros, but it
changes how ONNX Runtime blocks its sums, and in float16 that moves the last bit of activations.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from ..errors import CtkError, VerificationError, summary
from ..onnx_runtime import session
from ..passes.verify import relative_error, require_no_nan
from .context import value_shape

Feeds = dict[str, np.ndarray]
SYMBOLIC_SIZE = 2  # the size given to a dynamic dimension in sample inputs
_DEFAULT_ID_BOUND = 2  # ids for an integer input that indexes no constant table
FLOAT32_RTOL = 1e-5  # float32 and wider: the PyTorch verifier's tolerance
ROUNDING_UNITS = 20  # a low-precision graph's tolerance, in units of its dtype's rounding
UNIT_ROUNDOFF = {ir.DataType.FLOAT16: 2.0**-11, ir.DataType.BFLOAT16: 2.0**-8}  # half the gap after 1.0


def computed_float_dtypes(model: ir.Model) -> set[ir.DataType]:
    """The floating dtypes the main graph's nodes write (shapes and types inferred beforehand):
    the precision its arithmetic is rounded to, whatever its weights are stored in."""
    return {v.dtype for node in model.graph for v in node.outputs
            if v.dtype is not None and v.dtype.is_floating_point()}


def default_rtol(model: ir.Model, bfloat16_as_float32: bool = False) -> float:
    """The verification tolerance for a model: :data:`FLOAT32_RTOL`, or ``ROUNDING_UNITS`` units of
    rounding of the lowest precision it computes in (float16: 20 * 2**-11 = 9.8e-3; bfloat16:
    7.8e-2). Why 20 units: the strip of a 50%-pruned ResNet-18 in float16 (224 x 224) moved the
    output by 3.8e-5 of its largest value, and the same float16 file against its float32 source
    differs by 4.2e-4, so a deep float16 net may drift some units of 2**-11 on summation order
    alone; a wrongly removed channel moves outputs by far more (the tests' positive controls).
    ``bfloat16_as_float32``: the tolerance of the model's float32 twin (:mod:`.twin`)."""
    dtypes = computed_float_dtypes(model) - ({ir.DataType.BFLOAT16} if bfloat16_as_float32 else set())
    units = [UNIT_ROUNDOFF[d] for d in dtypes if d in UNIT_ROUNDOFF]
    return max([FLOAT32_RTOL, *(ROUNDING_UNITS * u for u in units)])


def sample_feeds(model: ir.Model, count: int = 3, seed: int = 0) -> list[Feeds]:
    """``count`` seeded inputs for the graph's inputs (initializers listed as inputs excluded)."""
    rng = np.random.default_rng(seed)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    samples = []
    for _ in range(count):
        samples.append({value.name: _sample(value, rng) for value in inputs})
    return samples


def _sample(value: ir.Value, rng: np.random.Generator) -> np.ndarray:
    shape = value_shape(value)
    if shape is None or value.dtype is None:
        raise CtkError(f"graph input {value.name} has no declared type and rank, so no sample input can be built")
    sizes = [SYMBOLIC_SIZE if s is None else s for s in shape]
    dtype = value.dtype
    if dtype.is_floating_point():
        return rng.standard_normal(sizes).astype(dtype.numpy())
    if dtype == ir.DataType.BOOL:
        return rng.random(sizes) < 0.5
    if dtype.is_integer():
        return rng.integers(0, _id_bound(value), size=sizes).astype(dtype.numpy())
    raise CtkError(f"graph input {value.name} has type {dtype.name}, for which no sample input can be built")


def _id_bound(value: ir.Value) -> int:
    """Ids stay below the rows of every constant table the input indexes (``Gather`` axis 0)."""
    bounds = []
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
            shape = value_shape(node.inputs[0])
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            if shape is not None and shape[axis] is not None:
                bounds.append(shape[axis])
    return min(bounds) if bounds else _DEFAULT_ID_BOUND


def run(model: str | bytes, feeds: list[Feeds]) -> list[list[torch.Tensor]]:
    """The outputs of a model (a path or serialized bytes) on each feed, as CPU tensors."""
    sess = session(model)
    return [[torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)] for feed in feeds]


def check_same_outputs(reference: list[list[torch.Tensor]], candidate: str | bytes, feeds: list[Feeds],
                       rtol: float) -> float:
    """The candidate file's largest relative error against ``reference``; raises
    :class:`VerificationError` beyond ``rtol``."""
    try:
        outputs = run(candidate, feeds)
    except Exception as error:  # onnxruntime's own exception types: the stripped graph is wrong
        raise VerificationError(f"ONNX Runtime cannot run the stripped model (the strip is wrong; nothing was "
                                f"written): {summary(error)}") from error
    error = relative_error(reference, outputs)
    if not error <= rtol:
        raise VerificationError(f"the ONNX strip changed the model's outputs in ONNX Runtime: max relative error "
                                f"{error:.3g} > {rtol:g}")
    return error


def reference_outputs(model: str | bytes, feeds: list[Feeds]) -> list[list[torch.Tensor]]:
    """The input file's outputs, refused when they hold NaN (nothing could be verified)."""
    outputs = run(model, feeds)
    require_no_nan(outputs, "its ONNX strip")
    return outputs
