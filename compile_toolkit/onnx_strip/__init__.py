"""Strip ONNX files made elsewhere: the channel analysis of ``channels/`` with an ONNX front-end.

``strip_onnx(path_or_model, out_path)`` finds every channel that is zero or dead in an ONNX
graph, removes it from every initializer and shape constant that carries it, verifies the result
in ONNX Runtime against the input and writes it atomically. The analysis is the one described in
``docs/architecture.md`` (the channel analysis); only the walk and the op rules are ONNX's own.
"""

from .strip import OnnxStripSummary, strip_onnx

__all__ = ["OnnxStripSummary", "strip_onnx"]
