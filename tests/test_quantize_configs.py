"""One config type per quantizer, carried out by ``quantize_``: what each front-end builds, and
the errors that come before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.export_job import ExportJob
from compile_toolkit.pruning import load_recipe
from compile_toolkit.quantize import PT2E, QAT, OrtAuto, OrtDynamic, OrtStatic, quantize_
from compile_toolkit.quantize.config import as_configs, with_learned_ranges
from compile_toolkit.quantize.registry import quantizer


def test_each_config_type_has_its_quantizer_and_declares_its_needs():
    assert quantizer(OrtStatic()).needs == ("calibration", "out_path") == quantizer(OrtDynamic()).needs
    assert quantizer(OrtAuto()).source == "a float ONNX file"
    assert quantizer(PT2E()).needs == ("calibration",) and quantizer(QAT()).needs == ()
    with pytest.raises(ctk.CtkError, match="OrtStatic quantization needs calibration and out_path"):
        quantize_("model.onnx", OrtStatic())
    with pytest.raises(ctk.CtkError, match="no quantizer for str"):
        quantizer("int8")


def test_qat_prepares_the_module_it_is_given():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert quantize_(model, QAT()) == ["0", "2"]
    assert type(model[0]).__module__.startswith("torch.ao.nn.qat")
    with pytest.raises(ctk.CtkError, match="unknown --qat 'int4'; valid: int8"):
        quantize_(model, QAT("int4"))


def test_auto_resolves_to_static_with_convolutions_and_keeps_every_shared_field():
    auto = OrtAuto(calibration_method="entropy", max_metric_drop=2.0, nodes_to_exclude=("a",))
    assert auto.resolve(has_conv=True) == OrtStatic(calibration_method="entropy", max_metric_drop=2.0,
                                                    nodes_to_exclude=("a",))
    assert auto.resolve(has_conv=False) == OrtDynamic(max_metric_drop=2.0, nodes_to_exclude=("a",))
    learned = auto.with_ranges({"fc": (0.0, 1.0)})
    assert isinstance(learned.resolve(has_conv=False), OrtStatic)  # learned ranges mean static


def test_the_dense_models_int8_is_measured_without_a_limit_or_the_trained_ranges():
    static = OrtStatic(max_metric_drop=0.5).with_ranges({"fc": (0.0, 1.0)})
    assert static.measured_only() == OrtStatic(max_metric_drop=None)
    assert OrtDynamic(max_metric_drop=0.5).measured_only() == OrtDynamic(max_metric_drop=None)
    configs = with_learned_ranges((OrtAuto(), PT2E()), {"fc": (0.0, 1.0)})
    assert configs[0].activation_ranges == (("fc", 0.0, 1.0),) and configs[1] == PT2E()
    assert with_learned_ranges((OrtDynamic(),), {}) == (OrtDynamic(),)  # a float checkpoint: nothing to add


def test_as_configs_takes_int8_or_one_config_of_each_kind():
    assert as_configs("int8") == (OrtAuto(), PT2E())
    assert as_configs(OrtDynamic()) == (OrtDynamic(),)
    with pytest.raises(ctk.CtkError, match="one config of each kind, got OrtStatic and OrtDynamic"):
        as_configs((OrtStatic(), OrtDynamic()))
    with pytest.raises(ctk.CtkError, match=r"got QAT \(trained by ctk train --qat int8\)"):
        as_configs(QAT())
    with pytest.raises(ctk.CtkError, match="'int8' or quantization configs, got 'int4'"):
        as_configs("int4")


def test_export_refuses_pt2e_without_the_pt2_artifact_before_any_work(tmp_path):
    model = nn.Conv2d(3, 4, 1)
    batches = [(torch.randn(2, 3, 4, 4),)]
    with pytest.raises(ctk.CtkError, match="PT2E writes model.int8.pt2 beside model.int8.onnx"):
        ctk.export(model, batches[0], str(tmp_path / "out"), formats=("onnx",), quantize=(OrtAuto(), PT2E()),
                   calibration=batches)
    assert not (tmp_path / "out").exists()


def test_the_cli_and_a_recipe_build_the_same_configs(tmp_path):
    cli = ExportJob(quantize="int8", calibration_method="entropy", max_metric_drop=2.0, formats=("onnx", "pt2"))
    assert cli.quant_configs() == (OrtAuto(calibration_method="entropy", max_metric_drop=2.0), PT2E())
    assert ExportJob(quantize="int8", formats=("onnx",)).quant_configs() == (OrtAuto(),)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\nschedule: {final_sparsity: 0.5}\n"
                      "quantize: {calibration_method: entropy, max_metric_drop: 2.0}\n")
    assert load_recipe(str(recipe)).quantize == cli.quant_configs()
    recipe.write_text("method: magnitude\nschedule: {final_sparsity: 0.5}\nquantize: {method: dynamic, pt2: false}\n")
    assert load_recipe(str(recipe)).quantize == (OrtDynamic(),)
    assert ExportJob().quant_configs() == ()
