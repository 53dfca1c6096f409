"""compile_toolkit: prune, capture, strip and export PyTorch models.

```python
import compile_toolkit as ctk
report = ctk.prune(model, example_inputs, sparsity=0.5, structure="channel", importance="l1")
stripped = ctk.strip(model, example_inputs)   # verified, smaller, callable like the model
ctk.export(stripped, "out/", formats=("torchscript", "pt2", "onnx", "stablehlo"))
```
"""

from .errors import CtkError, VerificationError
from .exporters import export
from .pruning import prune
from .strip import strip

__all__ = ["CtkError", "VerificationError", "export", "prune", "strip"]
