"""Long work says how far it is: plain done/total, rate and time-left lines at a steady interval,
in the job's log file (what a Slurm log shows)."""

import re

LINE = r"{what}: [\d,]+/[\d,]+ {unit} \([\d.]+ %\), [\d,.]+ {unit}/s, (\d+[hms]\d*[ms]?|\d+s|\?) left"


def test_index_cache_training_and_explain_print_progress_lines(trained_workflow):
    """The trained workflow's jobs ran with MEDFOLD_PROGRESS_SECONDS=0.05 (conftest): their logs."""
    work = trained_workflow
    logs = work / "results" / "demo_cxr14" / "logs"
    index_log = (logs / "index.log").read_text()
    assert re.search(LINE.format(what="index demo_cxr14", unit="images"), index_log), index_log[-2000:]
    assert re.search(LINE.format(what="cache 64 px", unit="images"), (logs / "cache_64.log").read_text())
    train_log = (work / "results" / "demo_cxr14" / "batchnorm" / "fold_0" / "train.log").read_text()
    assert re.search(LINE.format(what="fold 0 epoch 1", unit="batches"), train_log), train_log[-2000:]
    explain_log = next((work / "results").rglob("fold_0/explanations/explain.log")).read_text()
    assert re.search(LINE.format(what="explain fold 0", unit="images"), explain_log)
    # and a closing line with the total time
    assert re.search(r"index demo_cxr14: [\d,]+ images in \d+s", index_log)
