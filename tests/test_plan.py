"""medfold plan: a dataset's fingerprint read from its files, names and pixels, and the fixed
rules that turn it and a time budget into a complete config (docs/plan.md)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SNAKEFILE, planned

from medfold.data.demo import generate_cxr14, generate_folders, generate_fundus, generate_small_npz
from medfold.study.plan import (
    Budget,
    Candidate,
    candidates,
    choose,
    fingerprint,
    fit_batch,
    patients_from_names,
    plan,
    steps_batch,
    time_step,
)


def _grouping(names, regex):
    found = re.compile(regex)
    return {n: found.search(n).group("patient") for n in names}


def test_the_patient_pattern_groups_each_real_naming_scheme_as_its_hand_written_regex():
    kermany = ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "IM-0011-0001-0001.jpeg", "IM-0011-0001-0002.jpeg"]
    kermany += [f"NORMAL2-IM-{k:04d}-0001.jpeg" for k in range(60)]  # NORMAL2 is in 60 names: a prefix
    found = patients_from_names(kermany)
    assert found["prefixes"] == ["NORMAL2"] and found["explained"] == 1.0
    groups = _grouping(kermany, found["regex"])
    assert groups["person1_virus_6.jpeg"] == "person1" and groups["IM-0011-0001-0002.jpeg"] == "IM-0011"
    assert groups["NORMAL2-IM-0007-0001.jpeg"] == "NORMAL2-IM-0007"
    # NIH: a patient with many follow-ups stays one patient (a bare number is never a prefix)
    nih = [f"00000013_{k:03d}.png" for k in range(70)] + ["00000001_000.png"]
    found = patients_from_names(nih)
    assert found["prefixes"] == [] and found["patients"] == 2
    assert set(_grouping(nih, found["regex"]).values()) == {"00000013", "00000001"}
    odir = ["0_left.jpg", "0_right.jpg", "2_left.jpg"]
    assert patients_from_names(odir)["patients"] == 2
    alone = patients_from_names(["scan_a.png", "img_0001.png", "img_0002.png"])
    assert alone["regex"] is None and "stands alone" in alone["statement"]


def _timer(c: Candidate, channels, classes, device):
    """Seconds per image growing with the model and the pixels (the rules, not this machine)."""
    return 1e-3 * (c.image_size / 64) ** 2 * {"lenet": 1, "lenet_wide": 4, "resnet18": 10}[c.model]


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    folders = generate_folders(root / "chest_xray", 40, 0)
    cxr14 = generate_cxr14(root / "cxr14", 40, 0, label_errors=False)
    npz = generate_small_npz(root / "small.npz", 30, 0)
    fundus = generate_fundus(root / "fundus", 20, 0)
    return {"folders": folders, "csv": cxr14, "npz": npz, "fundus": fundus}


def test_each_form_is_read_into_its_dataset_block(forms):
    folders = fingerprint(forms["folders"])
    assert folders.format == "folders" and folders.roles.keys() == {"train", "test"}
    assert folders.patients["explained"] == 1.0 and folders.dataset["patient_regex"]
    assert folders.modality.startswith("radiograph") and folders.colour != "colour"
    csv = fingerprint(forms["csv"])
    d = csv.dataset
    assert (d["format"], d["path_column"], d["label_column"], d["label_separator"]) == (
        "csv",
        "Image Index",
        "Finding Labels",
        "|",
    )
    assert d["patient_column"] == "Patient ID" and d["no_finding_label"] == "No Finding" and csv.task == "multilabel"
    assert "Patient Gender" in d["metadata_columns"] and "No Finding" not in csv.classes
    npz = fingerprint(forms["npz"])
    assert npz.format == "npz" and npz.sizes["median_side"] == 28 and any("MedMNIST" in x for x in npz.doubts)
    fundus = fingerprint(forms["fundus"])
    assert fundus.colour == "colour" and fundus.modality.startswith("fundus")


def test_a_dicom_export_is_grouped_by_patientid_and_named_by_its_modality_header(tmp_path):
    from medfold.data.demo import generate_dicom

    export = generate_dicom(tmp_path / "export", 20, 0)  # files named by record number, headers hold the rest
    fp = fingerprint(export)
    assert fp.patients["source"] == "DICOM PatientID" and fp.patients["patients"] == 20
    assert fp.dataset["patient_regex"] is None  # the index reads each file's PatientID
    assert fp.modality == "radiograph (DICOM Modality CR)" and fp.colour == "grey"
    chosen = {d.key: d.value for d in plan(fp, 1800, timer=_timer)}
    assert chosen["training.augment"]["hflip"] == 0 and chosen["images.channels"] == 1


def test_a_tables_own_split_lists_are_its_roles_and_its_test_set_is_kept(forms, tmp_path):
    import shutil

    import pandas as pd

    shutil.copytree(forms["csv"].parent, tmp_path, dirs_exist_ok=True)
    table = tmp_path / forms["csv"].name
    names = pd.read_csv(table)["Image Index"].drop_duplicates().tolist()
    (tmp_path / "test_list.txt").write_text("\n".join(names[:30]) + "\n")  # NIH's two lists
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[30:]) + "\n")
    fp = fingerprint(table)
    assert fp.dataset["source_split_lists"] == {
        "test": str(tmp_path / "test_list.txt"),
        "train": str(tmp_path / "train_val_list.txt"),
    }
    assert fp.roles["test"] >= 30 and fp.roles["train"] > fp.roles["test"]
    chosen = {d.key: d.value for d in plan(fp, 1800, timer=_timer)}
    assert chosen["split.test_from_source"] is True and chosen["split.on_source_leak"] == "drop"


def test_the_rules_follow_the_modality_the_budget_and_the_dataset_s_own_test_set(forms):
    films = {d.key: d.value for d in plan(fingerprint(forms["folders"]), 1800, timer=_timer)}
    assert films["training.augment"]["hflip"] == 0 and films["training.tta"] == "none"  # laterality kept
    assert films["split.test_from_source"] is True and films["split.on_source_leak"] == "drop"
    assert films["images.channels"] == 1
    eyes = {d.key: d.value for d in plan(fingerprint(forms["fundus"]), 1800, timer=_timer)}
    assert eyes["training.augment"]["hflip"] == 0.5 and eyes["training.tta"] == "hflip" and eyes["images.channels"] == 3
    small = {d.key: d.value for d in plan(fingerprint(forms["npz"]), 1800, timer=_timer)}
    assert small["training.image_size"] == 28  # never enlarged past what the images hold


def test_a_larger_budget_buys_more_epochs_or_a_larger_model(forms):
    fp = fingerprint(forms["folders"])
    cands = candidates(fp, "cpu")
    for c in cands:
        c.seconds_per_image = _timer(c, 1, 3, "cpu")
    picks = [choose(cands, Budget(seconds, cores=2), 5000, 5) for seconds in (300, 1800, 36000)]
    sizes = [(cands.index(c), epochs) for c, epochs, _ in picks]
    assert sizes == sorted(sizes) and sizes[0] != sizes[-1]
    assert "raise --budget" in choose(cands, Budget(5, cores=2), 5000, 5)[2]


def test_a_pretrained_backbone_is_a_candidate_only_when_its_weights_are_cached(forms, monkeypatch, tmp_path):
    fp = fingerprint(forms["folders"])
    assert not any(c.pretrained for c in candidates(fp, "cpu", cached=lambda model: False))
    cands = candidates(fp, "cpu", cached=lambda model: True)
    assert [c.pretrained for c in cands if c.model == "resnet18"] == [None, "imagenet"] * 2  # at 64 and 128 px
    for c in cands:
        c.seconds_per_image = _timer(c, 1, 3, "cpu")
    chosen, _, _ = choose(cands, Budget(36000, cores=2), 500, 5)
    assert chosen.pretrained == "imagenet"  # the last, preferred, when the budget affords it
    # the real cache: torchvision's file name under $TORCH_HOME/hub/checkpoints
    from medfold.study.plan import weights_cached
    from medfold.training.models import torchvision_weights, weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not weights_cached("resnet18") and not weights_cached("lenet")
    path = weights_path(torchvision_weights("resnet18", "imagenet"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert weights_cached("resnet18") and path.is_relative_to(tmp_path)


def test_the_gpu_batch_is_the_largest_power_of_two_that_fits_half_the_free_memory():
    gib = 2**30
    assert fit_batch(per_image_bytes=50e6, fixed_bytes=1 * gib, free_bytes=80 * gib) == 256  # capped
    assert fit_batch(per_image_bytes=400e6, fixed_bytes=1 * gib, free_bytes=80 * gib) == 64  # 39 GiB / 0.4 GB
    assert fit_batch(per_image_bytes=400e6, fixed_bytes=1 * gib, free_bytes=16 * gib) == 16
    assert fit_batch(per_image_bytes=10 * gib, fixed_bytes=1 * gib, free_bytes=8 * gib) == 1  # never below one


def test_a_small_collection_gets_a_batch_with_enough_updates_an_epoch():
    assert steps_batch(5000, 64) == 64
    assert steps_batch(640, 64) == 32  # NIH1000's training folds: 20 updates an epoch
    assert steps_batch(366, 64) == 16
    assert steps_batch(100, 64) == 16  # never below 16
    assert steps_batch(100_000, 256) == 256


def test_on_gpus_the_batch_follows_the_memory_and_a_fold_runs_on_each_gpu(forms):
    """The GPU rules on the rule functions (no GPU here): the memory a step of each candidate
    needs sets its batch; the folds run side by side, one per GPU, and so afford more epochs."""
    gib = 2**30

    def memory(c, channels, classes):  # bytes per image grow with the pixels and the model
        per_image = 2e5 * (c.image_size / 64) ** 2 * {"lenet": 1, "lenet_wide": 4, "resnet18": 40}[c.model]
        return per_image, 0.5 * gib, 80 * gib

    fp = fingerprint(forms["folders"])
    planned = {gpus: plan(fp, 600, "cuda", cores=16, timer=_timer, gpus=gpus, memory=memory) for gpus in (1, 4)}
    one, four = ({d.key: d.value for d in decisions} for decisions in planned.values())
    assert one["training.device"] == "cuda" and one["training.gpus"] == 1 and four["training.threads"] == 4
    per_image = memory(Candidate(one["training.model"], one["training.image_size"], 0), 1, 2)[0]
    batch = next(d for d in planned[1] if d.key == "training.batch_size")
    train_images = int(re.search(r"on (\d+) training images", batch.reason).group(1))
    # what the memory holds, halved while an epoch would have under 20 updates (a small demo)
    assert fit_batch(per_image, 0.5 * gib, 80 * gib) > 32
    assert batch.value == steps_batch(train_images, fit_batch(per_image, 0.5 * gib, 80 * gib)) >= 16
    reasons = {gpus: next(d.reason for d in ds if d.key == "training.epochs") for gpus, ds in planned.items()}
    assert "over 5 round(s)" in reasons[1] and "over 2 round(s)" in reasons[4]  # 5 folds on 1 and on 4 GPUs
    order = [(c.model, c.image_size, c.pretrained) for c in candidates(fp, "cuda")]

    def rank(d):
        return order.index((d["training.model"], d["training.image_size"], d.get("training.pretrained"))), d[
            "training.epochs"
        ]

    assert rank(four) >= rank(one)  # more GPUs buy a larger model or more epochs, never less


def test_a_plan_that_is_not_there_stops_before_any_job(tmp_path):
    from conftest import resolved_config

    from medfold.core.errors import ConfigError
    from medfold.study.resolve import resolve

    with pytest.raises(ConfigError, match="plan: .*missing.json is not a file"):
        resolve(resolved_config({"plan": str(tmp_path / "missing.json")}))


def test_a_training_step_is_timed_on_this_machine():
    small, large = Candidate("lenet", 28, 16), Candidate("resnet18", 64, 16)
    fast, slow = time_step(small, 1, 2), time_step(large, 1, 2)
    assert 0 < fast < slow < 5


def test_medfold_plan_writes_a_config_that_resolves_and_plans_its_folds(forms, tmp_path):
    medfold = Path(sys.executable).with_name("medfold")
    proc = subprocess.run(
        [str(medfold), "plan", str(forms["folders"]), "--out", "planned.yaml", "--budget", "10m"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "patients from file names" in proc.stdout and "plan: " in proc.stdout
    text = (tmp_path / "planned.yaml").read_text()
    assert text.count("\n# ") + text.count("\n  # ") >= 10  # every decision under its reason
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["fingerprint"]["images"] > 0 and {d["key"] for d in record["decisions"]} >= {"training.epochs"}
    assert "person1" not in (tmp_path / "plan.json").read_text() + text  # counts of patients, never their IDs
    config = yaml.safe_load(text)
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--configfile", "planned.yaml", "-n"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert planned(dry)["train"] == config["split"]["folds"]
    again = subprocess.run(
        [str(medfold), "plan", str(forms["folders"]), "--out", "planned.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "exists" in again.stderr


def test_budget_beyond_sixty_epochs_buys_seeds_and_a_cosine_run_is_not_cut_short(forms):
    fp = fingerprint(forms["folders"])
    roomy = {d.key: d.value for d in plan(fp, 3600, timer=lambda *a: 1e-5)}  # every model affords 60+
    assert roomy["training.epochs"] == 60 and 1 < roomy["experiments"]["planned"]["repeats"] <= 5
    assert roomy["training.schedule"]["name"] == "cosine" and roomy["training.early_stopping"]["patience"] == 60
    cosine = {d.key: d.value for d in plan(fp, 150, timer=_timer)}  # 10-59 epochs: cosine, one seed
    assert 10 <= cosine["training.epochs"] < 60 and cosine["experiments"] == {"planned": {}}
    assert cosine["training.schedule"]["name"] == "cosine"
    assert cosine["training.early_stopping"]["patience"] == cosine["training.epochs"]
    short = {d.key: d.value for d in plan(fp, 100, timer=_timer)}  # under 10: plateau, early stopping
    assert short["training.epochs"] < 10 and "training.schedule" not in short
    assert short["training.early_stopping"]["patience"] == max(3, short["training.epochs"] // 4)
