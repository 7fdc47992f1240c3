"""Near-duplicate search at NIH ChestX-ray14 size: 112,120 fingerprints, every pair, every one
of the 8 orientations, against brute force in the same run.

Fingerprints are synthetic but shaped like radiographs': each bit has its own bias (the lowest
DCT frequencies of chest films are nearly always of one sign), drawn from 0.5 +- 0.4. Planted
near-duplicates: copies of random images in a random orientation with 0..max_distance random
bits flipped (JPEG, rescaling). Prints the search time (target: under 60 s on 2 cores), recall
of the planted pairs, agreement with brute force on the rows it compared, and the ratio of
brute force's time to the search's. Brute force is timed on a slice of query rows and scaled
to all rows (its cost is exactly linear in them: every row against every row).

Run: .venv/bin/python bench/near_duplicates.py            (112,120 images, about a minute)
     .venv/bin/python bench/near_duplicates.py --quick    (5,000 images, the test suite)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from medfold import fingerprint as fp
from medfold.hardware import describe


def synthetic(n: int, planted: int, max_distance: int, seed: int = 0) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(seed)
    bias = 0.5 + rng.uniform(-0.4, 0.4, fp.BITS)
    bits = (rng.random((n, fp.BITS)) < bias).astype(np.uint8)
    pairs = set()
    sources = rng.choice(n, planted, replace=False)
    targets = rng.permutation(np.setdiff1d(np.arange(n), sources))[:planted]
    for i, j in zip(sources, targets):
        copy = fp.oriented(bits[i : i + 1], int(rng.integers(8)))[0]
        flip = rng.choice(fp.BITS, int(rng.integers(0, max_distance + 1)), replace=False)
        copy[flip] ^= 1
        bits[j] = copy
        pairs.add((min(i, j), max(i, j)))
    return bits, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 fingerprints instead of 112,120")
    parser.add_argument("--max-distance", type=int, default=5)
    parser.add_argument("--brute-rows", type=int, default=None, help="query rows brute force is timed on")
    args = parser.parse_args()
    n = 5_000 if args.quick else 112_120
    brute_rows = args.brute_rows or (1_000 if args.quick else 2_000)
    print(f"host: {describe()}")
    bits, planted = synthetic(n, max(50, n // 500), args.max_distance)

    start = time.perf_counter()
    pairs = fp.near_duplicate_pairs(bits, args.max_distance)
    search = time.perf_counter() - start
    found = set(zip(pairs["a"].tolist(), pairs["b"].tolist()))
    recall = len(planted & found) / len(planted)

    rows = np.random.default_rng(1).choice(n, brute_rows, replace=False)
    start = time.perf_counter()
    brute = fp.brute_force_pairs(bits, args.max_distance, rows)
    brute_time = (time.perf_counter() - start) * n / brute_rows
    brute_set = set(zip(brute["a"].tolist(), brute["b"].tolist()))
    mine = {(a, b) for a, b in found if a in set(rows.tolist())}
    agree = mine == brute_set

    print(f"images {n:,}  max distance {args.max_distance} of {fp.BITS} bits  planted pairs {len(planted)}")
    print(f"search: {search:.2f} s, {len(pairs)} pairs found  (target < 60 s at 112,120)")
    print(f"recall of planted pairs: {recall:.4f}")
    print(
        f"brute force on {brute_rows:,} query rows: {len(brute_set)} pairs, the search's {len(mine)} "
        f"{'identical' if agree else 'DIFFERENT'}"
    )
    print(f"brute force, all rows (scaled from {brute_rows:,}): {brute_time:.1f} s")
    print(f"ratio brute force / search: {brute_time / search:.1f}x")
    ok = recall == 1.0 and agree and (args.quick or search < 60)
    print("TARGETS MET" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
