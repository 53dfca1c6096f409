"""Strip ONNX files made elsewhere: the channel analysis of ``channels/`` with an ONNX front-end.

``strip_onnx(path_or_model, out_path)`` finds every channel that is zero or dead in an ONNX
graph, removes it from every initializer and shape constant that carries it, verifies the result
in ONNX Runtime against the input and writes it atomically. The analysis is the one described in
``docs/architecture.md`` (the channel analysis); only the walk and the op rules are ONNX's own.

Attention as ``torch.onnx`` writes it (both exporters; eager and ``scaled_dot_product_attention``)
is followed, not a barrier: the head-splitting ``Reshape`` gives each head one atom for its
``head_dim`` features, ``Transpose``, rotary embedding (``Mul``/``Slice``/``Neg``/``Concat`` on the
head dim, which stays whole) and the grouped-query repeat (``Unsqueeze``/``Expand``/``Reshape``:
a key/value head and the query heads that read it are one channel) carry it, ``MatMul`` of two
activations (``q @ k^T``, ``p @ v``: :mod:`.rules.products`) keeps each head a batch slice,
``Softmax`` pins only the keys it normalises over, and the merging ``Reshape`` hands the heads to
the output projection. A head goes when it is zero or nobody reads it (a zero value head makes
its queries and keys dead). The TorchScript exporter's forms are followed too: the grouped-query
repeat's target computed through ``Equal``/``Where``/``ConstantOfShape``, a head merge whose
``-1`` only the output projection's features tell (``reshape(*input_shape, -1)``), Swin's
window attention (``Pad`` to whole windows, a fused ``qkv`` unpacked by ``Gather``, head reshapes
whose targets are written as constants where their computed entries would not follow), and
MaxViT's ``Einsum``. Not followed, so named barriers: batch-and-head merges with a symbolic
batch, and fused attention ops (``com.microsoft`` ``Attention``/``MultiHeadAttention``, opset 23
``Attention``).
"""

from .strip import OnnxStripSummary, strip_onnx

__all__ = ["OnnxStripSummary", "strip_onnx"]
