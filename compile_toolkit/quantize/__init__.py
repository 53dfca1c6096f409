"""int8 after strip: ONNX Runtime's static (QDQ) and dynamic quantizers for ``model.int8.onnx``,
torch's PT2E flow for ``model.int8.pt2``, judged by the task's metric, with the layers that lose
most kept in float.

```python
from compile_toolkit.quantize import QuantConfig, quantize
result = quantize("model.onnx", "model.int8.onnx", calibration=batches,
                  config=QuantConfig(calibration_method="entropy", max_metric_drop=1.0))
```
"""

from .api import QuantResult, quantize
from .config import QuantConfig
from .evaluate import Metric, accuracy_metric, fidelity_metric

__all__ = ["Metric", "QuantConfig", "QuantResult", "accuracy_metric", "fidelity_metric", "quantize"]
