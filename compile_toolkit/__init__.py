"""compile_toolkit: prune, capture, strip and export PyTorch models.

```python
import compile_toolkit as ctk
report = ctk.prune(model, example_inputs, sparsity=0.5, structure="channel", importance="l1")
stripped = ctk.strip(model, example_inputs)   # verified, smaller, callable like the model
ctk.export(stripped, example_inputs, "out/", formats=("pt2", "onnx"),
           quantize="int8", calibration=batches)   # + model.int8.onnx, model.int8.pt2
summary = ctk.strip_onnx("out/model.onnx", "out/smaller.onnx")   # any ONNX file, verified in ORT
```
"""

from .errors import CtkError, VerificationError
from .exporters import export
from .onnx_strip import OnnxStripSummary, strip_onnx
from .passes.strip import StripSummary
from .pruning import prune
from .quantize import QuantConfig, quantize
from .strip import strip, strip_summary

__all__ = [
    "CtkError", "OnnxStripSummary", "QuantConfig", "StripSummary", "VerificationError", "export", "prune", "quantize",
    "strip", "strip_onnx", "strip_summary",
]
