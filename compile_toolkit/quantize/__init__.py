"""int8 after strip: ONNX Runtime's static (QDQ) and dynamic quantizers for ``model.int8.onnx``,
torch's PT2E flow for ``model.int8.pt2``, quantization-aware training, each a config type carried
out by :func:`quantize_`; int8 files are judged by the task's metric, with the layers that lose most
kept in float.

```python
from compile_toolkit.quantize import OrtStatic, QuantData, quantize_
result = quantize_("model.onnx", OrtStatic(calibration_method="entropy", max_metric_drop=1.0),
                   QuantData(calibration=batches, out_path="model.int8.onnx"))
```
"""

from .api import QuantResult, quantize
from .config import PT2E, QAT, OrtAuto, OrtDynamic, OrtInt8, OrtStatic, QuantizeConfig
from .evaluate import Metric, accuracy_metric, fidelity_metric
from .registry import QuantData, quantize_

__all__ = ["PT2E", "QAT", "Metric", "OrtAuto", "OrtDynamic", "OrtInt8", "OrtStatic", "QuantData", "QuantResult",
           "QuantizeConfig", "accuracy_metric", "fidelity_metric", "quantize", "quantize_"]
