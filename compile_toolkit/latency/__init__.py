"""Pruning to a latency budget (issue 23): each coupled channel group's width (or a causal LM
layer's neurons or key/value groups) chosen from the latency of its layers measured in the
deployment runtime, not estimated from FLOPs.

- :mod:`.layers`: the convolutions and linear layers of the captured graph, their geometry and the
  groups their input and output channels belong to;
- :mod:`.onnx_layer` and :mod:`.table`: one layer as an ONNX model, timed at candidate widths in
  ONNX Runtime or OpenVINO (fp32 or int8 QDQ), cached per machine and runtime;
- :mod:`.plan`: what a width plan gives the knapsack (groups, layers, the config of a choice);
- :mod:`.groups`: a captured graph's coupled groups, their candidate widths and kept importance;
- :mod:`.decoder`: a causal LM's per-layer MLP neurons or key/value groups, from its modules;
- :mod:`.widths`: the knapsack that chooses the widths for a latency budget;
- :mod:`.overrides`: channel widths as a ``Channels`` config that ``prune_`` applies exactly.

:func:`compile_toolkit.latency_target.choose_widths` runs them and checks the result end to end.
"""
