"""Pruning recipes: one YAML file that says how to prune (method, targets, schedule, ignores,
per-layer overrides), usable as ``ctk prune --recipe file.yaml`` and from Python.

Every field is checked when the recipe is loaded, and an error names the file and the field
(``recipe bad.yaml: schedule.final_sparsity must be in [0, 1), got 1.5``), so a mistake is found
before any model is loaded or trained. Example (see docs/pruning.md for every field)::

    method: magnitude          # magnitude | N:M such as "2:4" | structured
    scope: global
    ignore: ["stem.*"]
    overrides: {"fc2.weight": 0.3}
    schedule: {type: gradual, final_sparsity: 0.8, end_step: 100, frequency: 10}
    finetune: {epochs: 5}
    quantize: {calibration_method: percentile, max_metric_drop: 0.5}   # ctk export --recipe
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bounded_yaml import load_yaml_file
from ..errors import CtkError, clip, shown
from ..quantize.config import (
    ACTIVATION_TYPES,
    CALIBRATION_METHODS,
    PT2E,
    OrtAuto,
    OrtDynamic,
    OrtStatic,
    QuantizeConfig,
)
from .configs import (
    ACTIVATION,
    CALIBRATED_METHODS,
    DECODER_STRUCTURES,
    DECODER_WEIGHTS,
    INFLUENCE,
    NM,
    STRUCTURES,
    Channels,
    DecoderStructures,
    DecoderWeights,
    Magnitude,
    default_importance,
    method_config,
)
from .importance import importance_names
from .schedule import GradualSchedule, round_schedule
from .unstructured import parse_n_m

SCHEDULE_TYPES = ("one_shot", "iterative", "gradual")
SCOPES = ("layer", "global", "decoder")  # decoder: each decoder linear of a causal LM alone, as --method magnitude
# Upper bounds on what makes a run long: far beyond any real recipe, they turn a typo
# (``epochs: 1000000000``) into an error instead of a job that never ends.
MAX_EPOCHS = 1000
MAX_ROUNDS = 100
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes
# Limits of the YAML itself (see _RecipeLoader): a real recipe has a few dozen nodes, 3 levels deep.
_REQUIRED = object()


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``method`` is ``magnitude``, an N:M pattern (``n_m`` holds it) or
    ``structured``; ``schedule`` is the sparsity schedule in steps (``gradual``), rounds
    (``iterative``) or a single step (``one_shot``)."""

    source: str
    method: str
    schedule_type: str
    schedule: GradualSchedule
    rounds: int = 1
    scope: str = "layer"
    structure: str = "channel"
    importance: str = "l1"
    round_to: int = 1
    targets: tuple[str, ...] = ("*.weight",)
    ignore: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    finetune_epochs: int = 0
    finetune_lr: float = 5e-3
    batch_size: int = 64
    group_lasso: float = 0.0
    bn_l1: float = 0.0
    regularization_epochs: int = 0
    calibration_size: int = 256
    seed: int = 0
    quantize: tuple[QuantizeConfig, ...] = ()
    pattern: str | None = None  # N:M of wanda and sparsegpt
    per_layer: bool = False
    calibration_samples: int | None = None  # sequences of calibration text (language-model methods)

    @property
    def structured(self) -> bool:
        return self.method == "structured"

    @property
    def calibrated(self) -> bool:
        """Whether the recipe prunes a language model on calibration text."""
        return self.method in CALIBRATED_METHODS or (self.structured and self.importance in (ACTIVATION, INFLUENCE))

    @property
    def language_model(self) -> bool:
        """Whether the recipe prunes a causal LM's decoder once (calibrated, or by magnitude), training nothing."""
        return self.calibrated or self.scope == "decoder"

    @property
    def config(self) -> Magnitude | NM | Channels | DecoderWeights | DecoderStructures:
        """What the recipe prunes, as the config every front-end builds, at its final sparsity
        (its schedule says the sparsity of each step)."""
        final = self.schedule.final_sparsity
        if self.method in CALIBRATED_METHODS:
            return DECODER_WEIGHTS[self.method](final, self.pattern)
        if self.structured and self.importance in (ACTIVATION, INFLUENCE):
            return DecoderStructures(self.structure, final, self.importance, self.per_layer)
        if self.structured:
            return Channels(final, self.structure, self.importance, self.round_to, self.seed, self.ignore,
                            self.overrides)
        if self.scope == "decoder":
            return DECODER_WEIGHTS["magnitude"](final, None if self.method == "magnitude" else self.method)
        if self.method == "magnitude":
            return Magnitude(final, self.scope, self.targets, self.ignore, self.overrides)
        return method_config(self.method, final, targets=self.targets, ignore=self.ignore)

    def error(self, where: str, message: str) -> CtkError:
        return CtkError(f"recipe {self.source}: {where} {message}")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe (safe YAML: a recipe is data, never code; and bounded, see
    :func:`~compile_toolkit.bounded_yaml.load_yaml_file`)."""
    return recipe_from_dict(load_yaml_file(path, "recipe"), str(path))


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """Validate a recipe given as a mapping (the parsed YAML); ``source`` names it in errors."""
    top = _Fields(data, source, "")
    method = top.take("method", str)
    n_m = _method(method, top)
    pattern = top.take("pattern", str, None) if method in CALIBRATED_METHODS else None
    if pattern is not None:
        n_m = _n_m(pattern, "pattern", top)
    schedule_type, schedule, rounds = _schedule_section(
        _Fields(top.take("schedule", dict), source, "schedule."), method, n_m
    )
    options = _method_options(top, method, n_m)
    options.update(_finetune_section(_Fields(top.take("finetune", dict, {}), source, "finetune."), schedule_type))
    options.update(_regularization_section(_Fields(top.take("regularization", dict, {}), source, "regularization.")))
    options["seed"] = top.take("seed", int, 0, minimum=0, maximum=MAX_SEED)
    quantize = top.take("quantize", dict, None)
    options["quantize"] = () if quantize is None else _quantize_section(_Fields(quantize, source, "quantize."))
    top.done()
    recipe = Recipe(
        source=source, method=method, schedule_type=schedule_type, schedule=schedule, rounds=rounds, pattern=pattern,
        **options
    )
    _check_language_model(recipe, top)
    return recipe


def _schedule_section(fields: _Fields, method: str, n_m: tuple[int, int] | None) -> tuple[str, GradualSchedule, int]:
    """(type, schedule, rounds) of the ``schedule`` mapping."""
    schedule_type = fields.take("type", str, "one_shot", choices=SCHEDULE_TYPES)
    default_final = (n_m[1] - n_m[0]) / n_m[1] if n_m else _REQUIRED
    final = fields.take("final_sparsity", float, default_final)
    initial = fields.take("initial_sparsity", float, 0.0)
    rounds = fields.take("rounds", int, 3, maximum=MAX_ROUNDS) if schedule_type == "iterative" else 1
    steps = {}
    if schedule_type == "gradual":
        steps = {k: fields.take(k, int, d) for k, d in (("start_step", 0), ("end_step", _REQUIRED), ("frequency", 1))}
    fields.done()
    schedule = _schedule(schedule_type, final, initial, rounds, steps, fields)
    if n_m and abs(final - default_final) > 1e-6:
        fields.fail("final_sparsity", f"must be {default_final:g} for method {method!r}, got {final!r}")
    if method == "structured" and schedule_type == "gradual":
        fields.fail(
            "type",
            "'gradual' prunes weights during training: use method magnitude or N:M, or 'iterative' for structured",
        )
    return schedule_type, schedule, rounds


def _method_options(top: _Fields, method: str, n_m: tuple[int, int] | None) -> dict[str, Any]:
    """The method's own fields (structured and unstructured take different ones), ignores, overrides."""
    options: dict[str, Any] = {}
    if method in CALIBRATED_METHODS:
        options["calibration_samples"] = top.take("calibration_samples", int, None, minimum=1)
        return options
    if method == "structured":
        structure = options["structure"] = top.take("structure", str, "channel", choices=STRUCTURES)
        options["importance"] = top.take("importance", str, default_importance(structure),
                                          choices=(*importance_names(), ACTIVATION, INFLUENCE))
        options["round_to"] = top.take("round_to", int, 1, minimum=1)
        options["calibration_size"] = top.take("calibration_size", int, 256, minimum=1)
        if options["importance"] in (ACTIVATION, INFLUENCE):
            options["per_layer"] = top.take("per_layer", bool, False)
            options["calibration_samples"] = top.take("calibration_samples", int, None, minimum=1)
    else:
        options["targets"] = tuple(top.take("targets", list, ["*.weight"], items=str))
        options["scope"] = top.take("scope", str, "layer", choices=SCOPES)
    options["ignore"] = tuple(top.take("ignore", list, [], items=str))
    options["overrides"] = _overrides(top)
    if n_m and (options["overrides"] or options.get("scope") == "global"):
        top.fail(
            "overrides" if options["overrides"] else "scope",
            f"does not apply to method {method!r} (every layer gets the same pattern)",
        )
    return options


def _finetune_section(fields: _Fields, schedule_type: str) -> dict[str, Any]:
    """Fine-tuning is optional after one-shot pruning and required by the schedules that train."""
    one_shot = schedule_type == "one_shot"
    options = {
        "finetune_epochs": fields.take(
            "epochs", int, 0 if one_shot else _REQUIRED, minimum=0 if one_shot else 1, maximum=MAX_EPOCHS
        ),
        "finetune_lr": fields.take("lr", float, 5e-3, positive=True),
        "batch_size": fields.take("batch_size", int, 64, minimum=1),
    }
    fields.done()
    return options


def _regularization_section(fields: _Fields) -> dict[str, Any]:
    """Penalty strengths and the epochs of penalised training before pruning."""
    group_lasso = fields.take("group_lasso", float, 0.0, minimum=0)
    bn_l1 = fields.take("bn_l1", float, 0.0, minimum=0)
    penalised = group_lasso > 0 or bn_l1 > 0
    epochs = fields.take("epochs", int, 1 if penalised else 0, minimum=1 if penalised else 0, maximum=MAX_EPOCHS)
    if epochs and not penalised:
        fields.fail("epochs", "needs a penalty: set group_lasso or bn_l1 above 0")
    fields.done()
    return {"group_lasso": group_lasso, "bn_l1": bn_l1, "regularization_epochs": epochs}


# A recipe's quantize: method, and the ONNX Runtime config it builds.
ORT_METHODS = {"auto": OrtAuto, "static": OrtStatic, "dynamic": OrtDynamic}
STATIC_FIELDS = ("calibration_method", "activation_type")


def _quantize_section(fields: _Fields) -> tuple[QuantizeConfig, ...]:
    """int8 after strip (docs/quantization.md): ``method`` (auto, static, dynamic) picks the ONNX
    Runtime config, the other keys are its fields by the same names (``max_metric_drop: null``
    measures without a limit), and ``pt2`` (default true) adds PT2E for the ``.pt2`` program."""
    fields.take("dtype", str, "int8", choices=("int8",))
    kind = ORT_METHODS[fields.take("method", str, "auto", choices=tuple(ORT_METHODS))]
    defaults = OrtStatic()
    values = {
        "per_channel": fields.take("per_channel", bool, defaults.per_channel),
        "mixed_precision": fields.take("mixed_precision", bool, defaults.mixed_precision),
        "max_float_fraction": fields.take("max_float_fraction", float, defaults.max_float_fraction, minimum=0),
        "nodes_to_exclude": tuple(fields.take("nodes_to_exclude", list, [], items=str)),
        "calibration_method": fields.take("calibration_method", str, defaults.calibration_method,
                                          choices=CALIBRATION_METHODS),
        "activation_type": fields.take("activation_type", str, defaults.activation_type, choices=ACTIVATION_TYPES),
    }
    limit = fields.data.get("max_metric_drop", defaults.max_metric_drop)
    values["max_metric_drop"] = None if limit is None else fields.take("max_metric_drop", float, limit, minimum=0)
    fields.seen.add("max_metric_drop")
    pt2 = fields.take("pt2", bool, True)
    fields.done()
    if kind is OrtDynamic:
        for name in STATIC_FIELDS:
            if name in fields.data:
                fields.fail(name, "is a static int8 field: dynamic int8 calibrates nothing")
            del values[name]
    if values["max_float_fraction"] >= 1:
        fields.fail("max_float_fraction", f"must be < 1 (some layers must be int8), got {values['max_float_fraction']!r}")
    config = kind(**values)
    return (config, PT2E()) if pt2 else (config,)


def _method(method: str, top: _Fields) -> tuple[int, int] | None:
    n_m = _n_m(method, "method", top)
    if n_m is None and method not in ("magnitude", "structured", *CALIBRATED_METHODS):
        top.fail("method", f"must be magnitude, structured, {', '.join(CALIBRATED_METHODS)} or an N:M pattern "
                           f"such as '2:4', got {shown(method)}")
    return n_m


def _n_m(value: str, key: str, top: _Fields) -> tuple[int, int] | None:
    try:
        return parse_n_m(value)
    except CtkError:
        top.fail(key, f"must be N:M with 0 < N < M, got {shown(value)}")


def _check_language_model(recipe: Recipe, top: _Fields) -> None:
    """The language-model configs prune once on calibration text: their structures and importances
    go together, and training belongs to ``ctk export --pruned`` / ``ctk train``."""
    decoder = recipe.language_model
    if recipe.scope == "decoder" and (recipe.targets != ("*.weight",) or recipe.ignore or recipe.overrides):
        top.fail("scope", "decoder prunes every linear of the decoder layers alike: drop targets, ignore and overrides")
    if recipe.structured and recipe.structure in ("query_head", "block") and not decoder:
        top.fail("importance", f"of structure {recipe.structure!r} must be {default_importance(recipe.structure)} "
                               f"(scored on calibration text), got {shown(recipe.importance)}")
    if not decoder:
        return
    if recipe.structured and recipe.structure not in DECODER_STRUCTURES:
        top.fail("structure", f"must be one of {', '.join(DECODER_STRUCTURES)} with importance "
                              f"{recipe.importance!r}, got {shown(recipe.structure)}")
    for where, used in (("schedule.type", recipe.schedule_type != "one_shot"), ("finetune.epochs", recipe.finetune_epochs),
                        ("regularization", recipe.regularization_epochs)):
        if used:
            top.fail(where, "does not apply to language-model pruning (one_shot, no training here: fine-tune "
                            "with ctk export --pruned or ctk train)")


def _schedule(
    kind: str, final: float, initial: float, rounds: int, steps: dict[str, int], fields: _Fields
) -> GradualSchedule:
    """Build the schedule; its own checks name the field, which gets the ``schedule.`` prefix."""
    try:
        if kind == "one_shot":
            if initial:
                fields.fail("initial_sparsity", "applies to iterative and gradual schedules only")
            return GradualSchedule.one_shot(final)
        if kind == "iterative":
            return round_schedule(final, rounds, initial)
        return GradualSchedule(final, initial, **steps)
    except CtkError as error:
        raise CtkError(f"recipe {fields.source}: schedule.{error}") from None


def _overrides(top: _Fields) -> dict[str, float]:
    overrides = top.take("overrides", dict, {})
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):
            top.fail("overrides", f"keys must be name patterns (strings), got {shown(pattern)}")
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
            top.fail(f"overrides[{shown(pattern)}]", f"must be a sparsity in [0, 1), got {shown(value)}")
    return {k: float(v) for k, v in overrides.items()}


class _Fields:
    """Reads one mapping of the recipe, field by field; unknown fields are errors (a misspelt
    option silently ignored would prune differently from what the user wrote)."""

    def __init__(self, data: Any, source: str, prefix: str) -> None:
        self.source, self.prefix = source, prefix
        if not isinstance(data, Mapping):
            where = prefix.rstrip(".") or "the top level"
            raise CtkError(f"recipe {source}: {where} must be a mapping of fields, got {type(data).__name__}")
        self.data = dict(data)
        self.seen: set[str] = set()

    def fail(self, key: str, message: str) -> None:
        """Raise the error of ``key``. Callers quote a value with :func:`shown`, never its whole
        repr: a value can be megabytes, or an alias whose repr is gigabytes."""
        raise CtkError(f"recipe {self.source}: {self.prefix}{key} {message}")

    def take(
        self,
        key: str,
        kind: type,
        default: Any = _REQUIRED,
        *,
        choices: tuple[str, ...] = (),
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
        items: type | None = None,
    ) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            self.fail(key, f"must be {_KIND_NAMES[kind]}, got {shown(value)}")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {shown(value)}")
        if (minimum is not None and value < minimum) or (positive and value <= 0):
            bound = f">= {minimum}" if minimum is not None else "> 0"
            self.fail(key, f"must be {bound}, got {shown(value)}")
        if maximum is not None and value > maximum:
            self.fail(key, f"must be <= {maximum}, got {shown(value)}")
        if items is not None and not all(isinstance(v, items) for v in value):
            self.fail(key, f"must be a list of {_KIND_NAMES[items].split()[-1]}s, got {shown(value)}")
        return float(value) if kind is float else value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen, key=str)
        if unknown:
            self.fail(clip(str(unknown[0])), f"is not a field here (known: {', '.join(sorted(self.seen))})")


_KIND_NAMES = {bool: "true or false", str: "a string", int: "an integer", float: "a finite number", list: "a list", dict: "a mapping"}
