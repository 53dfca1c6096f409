"""``export()``: capture once, write every requested format, verify each in its own runtime.
The formats are the :class:`~.registry.Exporter` objects of :mod:`.registry`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..capture import Inputs, capture
from ..errors import CtkError
from ..quantize import PT2E, Metric, QuantizeConfig
from ..quantize.config import as_configs, ort_config
from .artifact import Artifact
from .checks import as_inputs, build_checks
from .registry import BY_NAME, EXPORTERS, FOLLOWERS, ExportRun
from .sparse_onnx import FORMAT as SPARSE_ONNX
from .staging import prepare_out_dir

FORMATS: tuple[str, ...] = ("torchscript", "pt2", "onnx", "stablehlo")  # the default set: any model
# openvino: the optional package, converted from model.onnx; hf: a transformers causal LM only (``pretrained``)
ALL_FORMATS: tuple[str, ...] = (*FORMATS, "openvino", "hf")


def export(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], out_dir: str,
           formats: Sequence[str] = FORMATS, reference: nn.Module | None = None,
           check_inputs: Sequence[Inputs] | None = None, atol: float = 1e-4,
           rtol: float = 1e-4, sparse_onnx: bool = False,
           quantize: str | QuantizeConfig | Sequence[QuantizeConfig] | None = None,
           calibration: Iterable[Inputs] | None = None, metric: Metric | None = None,
           pretrained: nn.Module | None = None, tokenizer: object = None) -> list[Artifact]:
    """Write ``module`` to ``out_dir`` in each format and verify every artifact in its runtime.

    The module is captured once with ``torch.export`` (batch dynamic where the model allows it)
    and evaluated in eval mode. Each artifact must match ``reference`` (default: ``module``) on
    ``check_inputs`` (default: the example and a seeded random input of the same shapes; with a
    dynamic batch a second batch size is added) within ``atol + rtol * max|reference|``; else a
    VerificationError names the format and nothing is left under that format's name. Artifacts
    appear atomically, only once verified, and come back in the order of ``formats``.

    ``sparse_onnx`` (needs ``onnx`` in ``formats``) also writes ``model.sparse.onnx``, the ONNX
    model with mostly-zero weights as sparse initializers (smaller file after unstructured
    pruning; ONNX Runtime densifies them at load), verified like the others and returned right
    after the ``onnx`` artifact as format ``onnx-sparse``.

    ``quantize`` (configs of :mod:`compile_toolkit.quantize`: ``OrtAuto``, ``OrtStatic`` or
    ``OrtDynamic``, and ``PT2E``; ``"int8"`` is ``OrtAuto()``, plus ``PT2E()`` when ``pt2`` is in
    ``formats``) also writes ``model.int8.onnx`` (format ``onnx-int8``, after ``onnx``) quantized
    by ONNX Runtime and calibrated on ``calibration`` (input batches), judged by ``metric``
    (default: output cosine to float) against ``max_metric_drop``; with ``PT2E`` also
    ``model.int8.pt2`` (``pt2-int8``, after ``pt2``), where PT2E quantizes the graph.

    ``openvino`` (needs the optional ``openvino`` package) converts the verified ``model.onnx``
    (``onnx`` is added to ``formats`` when missing) to ``openvino/model.xml`` + ``model.bin``,
    verified in OpenVINO's CPU runtime in fp32; with ``quantize`` also ``openvino/model.int8.xml``
    from ``model.int8.onnx`` (format ``openvino-int8``, after ``openvino``; :mod:`.openvino_format`).

    ``hf`` writes ``module`` (stripped from the ``transformers`` causal LM ``pretrained``) as a
    ``transformers`` folder with ``tokenizer`` beside it, verified through
    ``AutoModelForCausalLM`` (see :mod:`.hf`).
    """
    wanted = list(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [name for name in wanted if name not in ALL_FORMATS]
    if unknown:
        raise CtkError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                       f"valid: {', '.join(ALL_FORMATS)}")
    configs = _quantize_configs(quantize, wanted)
    asked = _with_sources(wanted)
    derived = [name for name, on in ((SPARSE_ONNX, sparse_onnx), ("onnx-int8", bool(configs))) if on]
    for name in derived:
        if "onnx" not in asked:
            what = "sparse_onnx=True converts" if name == SPARSE_ONNX else "quantize makes model.int8.onnx from"
            raise CtkError(f"{what} the ONNX artifact: add 'onnx' to formats")
    run_names = _with_sources([*asked, *derived])
    given = {"calibration": calibration}
    for name in run_names:
        exporter = BY_NAME[name]
        if missing := [need for need in exporter.needs if given[need] is None]:
            raise CtkError(f"{name} needs {' and '.join(missing)} (calibration=[inputs, ...] for int8)")
        if exporter.refuse is not None and (reason := exporter.refuse(module, pretrained)):
            raise CtkError(f"{name}: {reason}")
    calibration = list(calibration) if calibration is not None else None  # read twice with openvino
    prepare_out_dir(out_dir)
    exporters = [e for e in EXPORTERS if e.name in run_names]
    started = {}
    try:
        for exporter in exporters:  # before the capture: the StableHLO worker imports torch_xla meanwhile
            if exporter.start is not None:
                started[exporter.name] = exporter.start(out_dir)
        captured = capture(module, as_inputs(example_inputs))
        checks = build_checks(reference if reference is not None else module, captured.example_inputs,
                              check_inputs, captured.dynamic_batch, atol, rtol)
        run = ExportRun(captured, checks, out_dir, module, configs, calibration, metric, pretrained, tokenizer,
                        started=started)
        for exporter in exporters:
            run.done.update(exporter.export(run))
    finally:
        for name, work in started.items():
            BY_NAME[name].close(work)
    return _in_order(asked, run.done)


def _quantize_configs(quantize: str | QuantizeConfig | Sequence[QuantizeConfig] | None,
                      formats: list[str]) -> tuple[QuantizeConfig, ...]:
    """The quantization configs asked for; ``"int8"`` asks PT2E only where ``pt2`` is exported, and
    PT2E asked for by config needs ``pt2`` and an ONNX Runtime config beside it."""
    if quantize is None:
        return ()
    configs = as_configs(quantize)
    if quantize == "int8" and "pt2" not in formats:
        return tuple(c for c in configs if not isinstance(c, PT2E))
    if any(isinstance(c, PT2E) for c in configs) and ("pt2" not in formats or ort_config(configs) is None):
        raise CtkError("PT2E writes model.int8.pt2 beside model.int8.onnx: add 'pt2' and 'onnx' to formats and an "
                       "ONNX Runtime config (OrtAuto, OrtStatic or OrtDynamic) to quantize")
    return configs


def _with_sources(names: list[str]) -> list[str]:
    """``names`` with every format they derive from, each source first (openvino needs onnx)."""
    found: list[str] = []
    for name in names:
        source = BY_NAME[name].derives_from
        if source is not None and source not in found:
            found += _with_sources([source])
        if name not in found:
            found.append(name)
    return found


def _in_order(asked: list[str], done: dict[str, Artifact]) -> list[Artifact]:
    """The artifacts in the order asked, each followed by those made from it (onnx, then its sparse
    and int8 copies)."""
    ordered: list[Artifact] = []
    for name in asked:
        ordered.append(done[name])
        ordered += [done[follower] for follower in FOLLOWERS.get(name, ()) if follower in done]
    return ordered
