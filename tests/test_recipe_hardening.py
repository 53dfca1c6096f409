"""Issue 20, items 6, 11 (recipes) and 16 (YAML nesting): a recipe or ``--tp-plan`` file that is
an alias bomb, nests thousands of levels deep, gives a key twice or holds a huge value is refused
in one short line that names the file, quickly and in bounded memory."""

from __future__ import annotations

import resource
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest
from test_cli import assert_clean_failure, run_cli  # tests/ is on sys.path (pytest rootdir)
from torch import nn

from compile_toolkit.errors import CtkError, shown
from compile_toolkit.pruning import load_recipe
from compile_toolkit.training.tp_plan import read_plan

SHORT = 300  # characters: an error is one line a person reads


def alias_bomb(width: int = 9, levels: int = 9) -> str:
    """The issue's bomb (about 400 bytes) under ``method:``: anchor ``a`` lists ``width`` strings,
    each next anchor lists ``width`` aliases of the one before, so ``width ** levels`` strings
    (387 million) once expanded; its repr in an error message took gigabytes."""
    names = [chr(ord("a") + level) for level in range(levels)]
    lines = ["method:", f"  a: &a [{','.join(['x'] * width)}]"]
    lines += [f"  {name}: &{name} [{','.join([f'*{before}'] * width)}]" for before, name in pairwise(names)]
    return "\n".join([*lines, "schedule: {final_sparsity: 0.5}", ""])


DEEP = "method: magnitude\nschedule: {final_sparsity: 0.5}\nignore: " + "[" * 3000 + "\n"
DUPLICATE = "method: magnitude\nschedule: {final_sparsity: 0.5}\nscope: layer\nschedule: {final_sparsity: 0.9}\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@contextmanager
def bounded(megabytes: int = 1024, seconds: float = 5.0) -> Iterator[None]:
    """Fail instead of swapping when the code inside allocates more than ``megabytes`` (the address
    space limit of this process, raised back afterwards) or runs longer than ``seconds``."""
    page = resource.getpagesize()
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * page
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = in_use + megabytes * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    start = time.perf_counter()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert time.perf_counter() - start < seconds


def refusal(path: Path) -> str:
    """The one-line message ``load_recipe`` refuses ``path`` with, in bounded memory and time."""
    with bounded(), pytest.raises(CtkError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"recipe {path}: ") and "\n" not in message and len(message) < SHORT, message[:SHORT]
    return message


def test_alias_bomb_is_refused_by_its_expanded_size(tmp_path):
    text = alias_bomb()
    assert len(text.encode()) < 500
    message = refusal(write(tmp_path, text))
    assert "more than 10000 YAML nodes with aliases expanded" in message


def test_alias_inside_its_own_anchor_is_refused(tmp_path):
    message = refusal(write(tmp_path, "method: magnitude\nschedule: {final_sparsity: 0.5}\nignore: &loop [*loop]\n"))
    assert "alias *loop at line 3 is inside its own anchor" in message


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deep_nesting_is_one_line(tmp_path, opening):
    text = "method: magnitude\nschedule: {final_sparsity: 0.5}\nignore: " + opening * 3000 + "\n"
    assert "nested more than 50 levels deep at line 3" in refusal(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, key, lines",
    [
        (DUPLICATE, "'schedule'", "lines 2 and 4"),
        ("method: magnitude\nschedule:\n  final_sparsity: 0.5\n  final_sparsity: 0.8\n", "'final_sparsity'",
         "lines 3 and 4"),
        ("method: magnitude\nschedule: {final_sparsity: 0.5}\noverrides: {fc.weight: 0.1, fc.weight: 0.2}\n",
         "'fc.weight'", "lines 3 and 3"),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text, key, lines):
    assert f"key {key} is given twice ({lines})" in refusal(write(tmp_path, text))


ONE_SHOT = "method: magnitude\nschedule: {final_sparsity: 0.5}\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("method: " + "m" * 100_000 + "\nschedule: {}", "method must be magnitude, structured, wanda, sparsegpt or an N:M pattern"),
        ("method: '" + "7" * 5000 + ":8'\nschedule: {}", "method must be magnitude, structured, wanda, sparsegpt or an N:M pattern"),
        (ONE_SHOT + "ignore: [" + ", ".join(["[" + "y" * 10_000 + "]"] * 100) + "]", "ignore must be a list of strings"),
        (ONE_SHOT + "overrides:\n  ? " + "w" * 100_000 + "\n  : 2", "overrides['wwww"),
        (ONE_SHOT + "overrides: {fc: " + "9" * 4000 + "}", "overrides['fc'] must be a sparsity in [0, 1), got <"),
        (ONE_SHOT + "? " + "z" * 100_000 + "\n: 1", "zzzz... is not a field here"),
        (ONE_SHOT + "seed: " + "9" * 5000, "line 3 is not a valid int (Exceeds the limit (4300 digits)"),
        (ONE_SHOT + "seed: 2001-13-45", "'2001-13-45' at line 3 is not a valid timestamp (month must be in 1..12)"),
        (ONE_SHOT + "seed: !!int ''", "'' at line 3 is not a valid int"),
    ],
)
def test_values_in_messages_are_cut(tmp_path, text, needle):
    assert needle in refusal(write(tmp_path, text))


def test_shown_visits_only_what_it_prints():
    bomb: object = "x"
    for _ in range(40):  # 10 ** 40 strings once expanded
        bomb = [bomb] * 10
    assert len(shown(bomb)) <= 80 and shown("abc") == "'abc'" and shown(10**5000) == "<16610-bit integer>"


@pytest.mark.parametrize("text", [alias_bomb(), DEEP, DUPLICATE, "method: " + "m" * 1_000_000 + "\n"])
def test_the_cli_refuses_bad_yaml_in_one_short_line(tmp_path, capsys, text):
    path = write(tmp_path, text)
    with bounded(seconds=10):
        status, err = run_cli(["prune", "--recipe", str(path), "--out", str(tmp_path / "out")], capsys)
    assert status == 1
    assert_clean_failure(status, err, f"recipe {path}: ")
    assert len(err) < SHORT, err[:SHORT]
    assert not (tmp_path / "out").exists()


def test_aliases_and_merges_within_the_limits_load(tmp_path):
    path = write(tmp_path, textwrap.dedent("""\
        method: magnitude
        ignore: ["stem.*"]
        overrides: {fc1.weight: &low 0.25, fc2.weight: *low, fc3.weight: *low}
        schedule: {<<: {type: iterative, rounds: 2, final_sparsity: 0.3}, final_sparsity: 0.5}
        finetune: {epochs: 2}
        """))
    recipe = load_recipe(path)
    assert recipe.overrides == dict.fromkeys(("fc1.weight", "fc2.weight", "fc3.weight"), 0.25)
    assert recipe.rounds == 2 and recipe.schedule.final_sparsity == 0.5


def test_a_long_list_within_the_limits_loads(tmp_path):
    names = ", ".join(f"node_{i}" for i in range(2000))
    recipe = load_recipe(write(tmp_path, ONE_SHOT + f"quantize: {{nodes_to_exclude: [{names}]}}\n"))
    assert len(recipe.quantize[0].nodes_to_exclude) == 2000


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"0": "colwise", "2": "rowwise", "0": "rowwise"}', "'0' is given twice"),
        ('{"0": ' + "[" * 3000 + "]" * 3000 + "}", "nests too deeply"),
        ('{"' + "n" * 100_000 + '": "colwise"}', "Sequential has no module 'nnnn"),
        ('{"0": [' + ", ".join(['"' + "s" * 1000 + '"'] * 1000) + "]}", "module '0' has style ['ssss"),
    ],
)
def test_bad_tp_plans_are_one_short_line(tmp_path, text, needle):
    path = write(tmp_path, text, "plan.json")
    with pytest.raises(CtkError) as caught:
        read_plan(str(path), mlp(), 2)
    message = str(caught.value)
    assert message.startswith(f"--tp-plan {path}") and needle in message and len(message) < SHORT, message[:SHORT]
