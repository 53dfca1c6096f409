"""Fuzz the strip pass: thousands of random architectures with known zero patterns.

Each case (one seed: ``tests/fuzz_models.py`` draws its structure, weights and zeros from it) is
stripped with ``ctk.strip``, compared with the unstripped model on fresh inputs (1e-5 relative,
NaN-aware) and checked against the generator's own count of removable channels. Prints cases per
second as it goes, every failure with the seed and spec that reproduce it, and exits 1 on any
mismatch, oracle failure or crash, or when the time limit stops it short of ``--cases``.

    python tools/fuzz_strip.py --cases 10000 --minutes 90 --jobs 2
    python tools/fuzz_strip.py --seed 1234 --cases 1      # reproduce case 1234
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzz_models  # noqa: E402


def run_seed(seed: int) -> tuple[int, str, fuzz_models.Outcome]:
    torch.set_num_threads(1)
    spec = fuzz_models.draw_spec(fuzz_models.RandomDraw(seed))
    return seed, repr(spec), fuzz_models.run_case(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=120.0, help="stop after this long (a partial run fails)")
    parser.add_argument("--seed", type=int, default=0, help="first case seed; case i uses seed + i")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--every", type=int, default=500, help="print progress every this many cases")
    args = parser.parse_args(argv)
    start = time.monotonic()
    failed = done = checked = excused = removed = 0
    reasons: collections.Counter[str] = collections.Counter()
    seeds = range(args.seed, args.seed + args.cases)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for seed, spec, outcome in pool.imap_unordered(run_seed, seeds, chunksize=4):
            done += 1
            checked, excused, removed = checked + outcome.checked, excused + outcome.excused, removed + outcome.removed
            reasons.update(outcome.reasons)
            if outcome.failures:
                failed += 1
                print(f"FAIL seed {seed}: {spec}", flush=True)
                for line in outcome.failures:
                    print(f"    {line}", flush=True)
            elapsed = time.monotonic() - start
            if done % args.every == 0:
                print(f"{done} cases, {failed} failed, {elapsed:.0f} s, {done / elapsed:.2f} cases/s", flush=True)
            if elapsed > args.minutes * 60:
                pool.terminate()
                break
    elapsed = time.monotonic() - start
    print(f"done: {done} of {args.cases} cases in {elapsed:.0f} s ({done / elapsed:.2f} cases/s, {args.jobs} jobs), "
          f"{failed} failed; the oracle bounded {checked} parameter dims and excused {excused} "
          f"(their group reports kept_because); {removed} channels removed")
    for reason, count in reasons.most_common(8):
        print(f"    excused {count}x: {reason}")
    if done < args.cases:
        print(f"time limit reached after {done} of {args.cases} cases")
    return 1 if failed or done < args.cases else 0


if __name__ == "__main__":
    sys.exit(main())
