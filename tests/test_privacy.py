"""Pseudonyms, the results folder's key and the scrubbing of records and log lines."""

import hashlib
import hmac
import logging
import multiprocessing
import stat

import pandas as pd

from medfold.core.privacy import (
    KEY_FILE,
    Pseudonyms,
    Scrubber,
    index_scrubber,
    results_key,
    scrubbed_logs,
    shareable_view,
    shared_splits,
)


def _key_of(folder):
    return results_key(folder).hex()


def test_the_key_is_made_once_per_results_folder_even_when_jobs_race(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        keys = pool.map(_key_of, [tmp_path] * 8)
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no draft left behind
    assert results_key(tmp_path).hex() == keys[0]


def test_pseudonyms_are_keyed_hashes_the_same_for_the_same_id_and_raw_when_asked():
    key = bytes(range(32))
    names = Pseudonyms(key)
    digest = hmac.new(key, b"patient:1475165", hashlib.sha256).hexdigest()[:12]
    assert names.patient("1475165") == "P" + digest == names.patient("1475165")
    assert names.patient("1475166") != names.patient("1475165")
    assert Pseudonyms(bytes(32)).patient("1475165") != names.patient("1475165")  # another folder, another name
    image = names.image("Normal/1475165_0.dcm")
    assert image.startswith("I") and image.endswith(".dcm") and "1475165" not in image
    assert Pseudonyms(None).patient("1475165") == "1475165" and Pseudonyms(None).image("a/b.png") == "a/b.png"


def test_records_and_log_lines_lose_ids_and_keep_their_numbers(tmp_path):
    names = Pseudonyms(bytes(range(32)))
    index = names.with_shared_ids(
        pd.DataFrame(
            {
                "image_id": ["Normal/1475165_0.dcm", "Normal/2_0.png"],
                "path": ["/data/export/Normal/1475165_0.dcm", "/data/export/Normal/2_0.png"],
                "patient_id": ["1475165", "2"],
                "patient_aliases": [["3310042"], []],
            }
        )
    )
    scrub = index_scrubber(index)
    record = {
        "patients": ["2", "1475165"],
        "distances": {"0": 4, "2": 1},
        "skipped": [{"path": "/data/export/Normal/1475165_9.dcm", "reason": "truncated image"}],
        "message": "fold 2: 20 epochs; Normal/2_0.png ~ Normal/1475165_0.dcm (test); alias 3310042",
    }
    clean = scrub.record(record)
    shared = dict(zip(index["patient_id"], index["shared_patient_id"]))
    assert clean["patients"] == [shared["2"], shared["1475165"]]
    assert clean["distances"] == {"0": 4, "2": 1}  # counts keyed by distance: numbers, not patients
    assert clean["skipped"][0]["path"] == f"/data/export/Normal/{shared['1475165']}_9.dcm"
    image_of = dict(zip(index["image_id"], index["shared_image_id"]))
    assert clean["message"] == (
        f"fold 2: 20 epochs; {image_of['Normal/2_0.png']} ~ {image_of['Normal/1475165_0.dcm']} (test); "
        f"alias {names.patient('3310042')}"
    )
    # the same in log lines, whatever code writes them
    log = tmp_path / "step.log"
    handler = logging.FileHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        with scrubbed_logs(scrub):
            logging.getLogger("medfold.test").warning("skipped %s: %s", "/data/export/Normal/1475165_0.dcm", "corrupt")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert "1475165" not in log.read_text() and image_of["Normal/1475165_0.dcm"] in log.read_text()
    assert Scrubber({}).text("1475165") == "1475165"  # raw: nothing to replace


def test_the_shareable_view_and_splits_carry_the_shared_ids_in_the_same_rows():
    names = Pseudonyms(bytes(range(32)))
    index = names.with_shared_ids(
        pd.DataFrame(
            {
                "image_id": ["a.png", "b.png"],
                "path": ["/x/a.png", "/x/b.png"],
                "patient_id": ["p1", "p2"],
                "patient_aliases": [["p9"], []],
            }
        )
    )
    view = shareable_view(index)
    assert (
        view["image_id"].tolist() == index["shared_image_id"].tolist()
        and view["path"].tolist() == view["image_id"].tolist()
    )
    assert view["patient_aliases"].tolist() == [[names.patient("p9")], []]
    splits = pd.DataFrame(
        {"image_id": ["b.png", "a.png"], "patient_id": ["p2", "p1"], "set": ["cv", "test"], "fold": [0, -1]}
    )
    shared = shared_splits(index, splits)
    assert shared["image_id"].tolist() == [names.image("b.png"), names.image("a.png")]
    assert shared["patient_id"].tolist() == [names.patient("p2"), names.patient("p1")]


def test_bootstrap_draws_do_not_depend_on_how_patients_are_named():
    from medfold.evaluation.clinical.stats import PatientBootstrap

    # the same patients under two keys: pseudonyms that sort in another order
    first = PatientBootstrap(["Pb", "Pa", "Pb", "Pc", "Pa"], 50, seed=3).weights()
    second = PatientBootstrap(["Pz", "Py", "Pz", "Px", "Py"], 50, seed=3).weights()
    assert (first == second).all() and first.shape == (50, 5)
