"""compile_toolkit: prune, capture, strip and export PyTorch models.

```python
import compile_toolkit as ctk
report = ctk.prune(model, example_inputs, sparsity=0.5, structure="channel", importance="l1")
pruned = ctk.prune_(model, ctk.Channels(0.5, "channel", "l1"), ctk.PruneData(example_inputs))  # any config
stripped = ctk.strip(model, example_inputs)   # verified, smaller, callable like the model
ctk.export(stripped, example_inputs, "out/", formats=("pt2", "onnx"),
           quantize="int8", calibration=batches)   # + model.int8.onnx, model.int8.pt2
ctk.quantize_("out/model.onnx", ctk.OrtStatic(calibration_method="entropy"),   # any quantization config
              ctk.QuantData(calibration=batches, out_path="out/model.int8.onnx"))
summary = ctk.strip_onnx("out/model.onnx", "out/smaller.onnx")   # any ONNX file, verified in ORT
```
"""

from .errors import CtkError, VerificationError
from .exporters import export
from .onnx_strip import OnnxStripSummary, strip_onnx
from .passes.strip import StripSummary
from .pruning import prune
from .pruning.configs import NM, Channels, DecoderStructures, Magnitude, SparseGPT, Wanda
from .pruning.prune_ import PruneData, prune_
from .quantize import PT2E, OrtAuto, OrtDynamic, OrtStatic, QuantData, quantize, quantize_
from .strip import strip, strip_summary

__all__ = [
    "NM", "PT2E", "Channels", "CtkError", "DecoderStructures", "Magnitude", "OnnxStripSummary", "OrtAuto",
    "OrtDynamic", "OrtStatic", "PruneData", "QuantData", "SparseGPT", "StripSummary", "VerificationError", "Wanda",
    "export", "prune", "prune_", "quantize", "quantize_", "strip", "strip_onnx", "strip_summary",
]
