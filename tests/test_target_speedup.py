"""``ctk export --pruned --target-speedup X``: the sparsity is chosen by measured probes in the
deployment runtime (pruned, stripped, exported, verified and timed), the smallest that meets the
target; the report puts the final measured speedup beside it; an unreachable target is one line."""

from __future__ import annotations

import json

from test_cli import assert_clean_failure, run_cli

from compile_toolkit.latency_target import MAX_SPARSITY, RESOLUTION


def test_the_job_prunes_as_little_as_meets_the_target_and_reports_the_measured_speedup(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--target-speedup", "1.3", "--no-finetune", "--formats", "onnx",
                           "--out", str(out)], capsys)
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    target = report["pruning"]["target"]
    probes = target["probes"]
    assert target["target"] == 1.3 and target["runtime"] == "ort"
    assert probes[0]["sparsity"] == MAX_SPARSITY and probes[0]["speedup"] >= 1.3
    assert 0 < target["sparsity"] <= MAX_SPARSITY and report["sparsity"] == target["sparsity"]
    chosen = [p for p in probes if p["sparsity"] == target["sparsity"]]
    assert chosen and chosen[-1]["speedup"] >= 1.3 == target["target"]  # the chosen sparsity met the target
    # bisection: every probe below the chosen sparsity missed the target, and the bracket closed
    below = [p["sparsity"] for p in probes if p["sparsity"] < target["sparsity"]]
    assert all(p["speedup"] < 1.3 for p in probes if p["sparsity"] < target["sparsity"])
    assert target["sparsity"] - max(below, default=0.0) <= RESOLUTION
    assert report["pruning"]["sparsity"] == target["sparsity"]  # the model was pruned at the chosen sparsity
    assert target["speedup"] == report["speedup"] and target["met"] == (report["speedup"] >= 1.3)


def test_an_unreachable_target_is_one_line_before_any_fine_tuning(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--target-speedup", "1000", "--formats", "onnx", "--out", str(out)],
                          capsys)
    assert_clean_failure(status, err, "--target-speedup 1000 cannot be met in ort", f"{MAX_SPARSITY:.0%}")
    assert "fine-tune" not in err and not out.exists()


def test_target_speedup_options_are_checked_before_any_work(tmp_path, capsys):
    for args, needle in ((["--target-speedup", "2"], "add --pruned"),
                         (["--pruned", "--target-speedup", "2", "--sparsity", "0.3"], "drop --sparsity"),
                         (["--pruned", "--target-speedup", "0.5"], "above 1"),
                         (["--pruned", "--target-speedup", "nan"], "above 1"),
                         (["--pruned", "--target-speedup", "2", "--method", "wanda"], "--method wanda prunes the decoder")):
        status, err = run_cli(["export", *args, "--out", str(tmp_path / "out")], capsys)
        assert_clean_failure(status, err, needle)
        assert not (tmp_path / "out").exists()
