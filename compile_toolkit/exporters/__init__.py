"""Export a model to TorchScript, torch.export (``.pt2``), ONNX and StableHLO, each artifact
verified in the runtime that will run it (principle 4 of the architecture).

One module per format (``torchscript``, ``pt2``, ``onnx_format``, ``stablehlo``, ``openvino_format``,
``hf`` for a transformers folder of a causal LM; ``sparse_onnx`` for the optional sparse-initializer
copy of the ONNX file, ``int8`` for the quantized ones), each an :class:`~.registry.Exporter` in
``registry`` (what it derives from and needs), ``dispatch`` for the entry point, ``checks`` for the
shared comparison.
"""

from .artifact import Artifact
from .dispatch import ALL_FORMATS, FORMATS, export

__all__ = ["ALL_FORMATS", "Artifact", "FORMATS", "export"]
