"""Every benchmark docs/benchmarks.md gives runs in its quick mode (tiny sizes; the full size stays
a manual run), so a renamed key or a moved function fails here. Each must print the host's ISA, its
ratio against a baseline measured in the same run, and its verdict line."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

README_BENCHES = re.findall(r"^\.venv/bin/python (bench/\S+\.py)", (REPO / "docs" / "benchmarks.md").read_text(), re.M)


def test_readme_lists_every_benchmark():
    assert sorted(set(README_BENCHES)) == sorted(p.relative_to(REPO).as_posix() for p in (REPO / "bench").glob("*.py"))


@pytest.mark.parametrize(
    "bench,expected",
    [
        ("bench/index_split_nih.py", [r"ratio ours/baseline: abs \d", r"index [\d.]+ s \+ split"]),
        (
            "bench/near_duplicates.py",
            [
                r"^crop_mild +1\.000 +1\.000 +1\.000 +0\.9\d\d$",  # recall by kind, every copy found
                r"RECALL mild envelope .*: 1\.0000",
                r"^MODALITY radiographs \(grey, full frame\); size as stored$",
                r"^CLUSTERS largest \d+ after the core check \(\d+ chained before it; \d+ links cut\)$",
                r"FALSE MERGES at most 0 \[\] = 0\.00 per million",
                r"SEPARATION planted copies .* distinct patients' pairs p99\.9 0\.[0-7]",
                r"matching 3,000 images on 2 threads: [\d.]+ s in all",
                r"the graph found 0\.9\d+ of its exact neighbours",
                r"ratio brute force / graph search: [\d.]+x",
                "TARGETS MET",
            ],
        ),
        ("bench/data_path.py", [r"ratio: [\d.]+x"]),
        (
            "bench/index_throughput.py",
            [
                r"224 px JPEG +96 files +plain PIL decode +[\d.]+ +index +[\d.]+ +ratio index/decode [\d.]+",
                r"1024 px PNG +24 files .* ratio index/decode [\d.]+",
                r"cache 224 px .* of which decoding [\d.]+ s \(\d+%\)",
            ],
        ),
        (
            "bench/compression.py",
            [r"RATIO int8/fp32 size", r"RATIO int8 speed-up b1 vs eager", r"pruned [\d.]+x", r"int8 FX \w+ eager b1"],
        ),
        ("bench/train_loop.py", [r"lenet +28 px .* plain +[\d.]+ img/s +medfold +[\d.]+ img/s +ratio [\d.]+"]),
        (
            "bench/export.py",
            [
                r"lenet +64 px 3 folds .* ratio onnxruntime/torch speed b1 [\d.]+x b32 [\d.]+x +max \|diff\| [\d.e-]+$",
                r"^VERDICT the exported file under onnxruntime is .* \(lowest ratio [\d.]+x\)",
            ],
        ),
        (
            "bench/plan.py",
            [
                r"^demo_folders: plan \w+ at \d+ px, \d+ epochs, 2 folds$",
                r"^demo_folders +plan +\d+s +[\d.]+x +0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]",
                r"^demo_folders +lenet_bn_3 +\d+s",
                r"RATIO demo_folders: plan - best hand-written test AUROC [+-][\d.]+; plan wall / budget [\d.]+",
            ],
        ),
        (
            "bench/recipe.py",
            [r"^plain +[\d.]+ +\+0\.000", r"^all of them +[\d.]+", r"RATIO all/plain test AUROC: [\d.]+"],
        ),
    ],
)
def test_benchmark_quick_mode_runs_and_prints_its_ratio(bench, expected):
    assert bench in README_BENCHES
    proc = subprocess.run(
        [sys.executable, str(REPO / bench), "--quick"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^host: .*ISA (avx2|avx512|avx512_vnni|amx|baseline)", proc.stdout, re.M), proc.stdout[:500]
    for pattern in expected:
        assert re.search(pattern, proc.stdout, re.M), (pattern, proc.stdout[-2000:])


def test_the_data_path_at_nih_scale_in_its_quick_mode(tmp_path):
    """bench/data_path.py --scale nih (issue #29): cold reads of a generated cache, medfold's
    shuffled batches against the sequential read and a GPU's need, with and without read-ahead."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/data_path.py"), "--scale", "nih", "--quick", "--dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^host: .*ISA (avx2|avx512|avx512_vnni|amx|baseline)", proc.stdout, re.M), proc.stdout[:500]
    for size in (64, 128):
        assert f"4,000 images at {size} px" in proc.stdout
    assert len(re.findall(r"medfold batches, seeded shuffle: +[\d,]+ img/s = [\d.]+ of sequential", proc.stdout)) == 2
    assert len(re.findall(r"read_ahead \d: +[\d,]+ img/s = [\d.]+x without read-ahead", proc.stdout)) == 6
    assert not list(tmp_path.glob("*.npy"))  # the quick mode's caches are removed
