"""Export a model to TorchScript, torch.export (``.pt2``), ONNX and StableHLO, each artifact
verified in the runtime that will run it (principle 4 of the architecture).

One module per format (``torchscript``, ``pt2``, ``onnx_format``, ``stablehlo``, ``hf`` for a
transformers folder of a causal LM; ``sparse_onnx`` for
the optional sparse-initializer copy of the ONNX file), ``dispatch`` for the entry point,
``program`` for the shared capture, ``checks`` for the shared comparison.
"""

from .artifact import Artifact
from .dispatch import ALL_FORMATS, FORMATS, export

__all__ = ["ALL_FORMATS", "Artifact", "FORMATS", "export"]
