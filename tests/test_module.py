"""medfold as a Snakemake module of a project of one's own, as snakedeploy deploys a workflow:
the project holds its config and results, the workflow stays where it is."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, TRAINING_ONLY, merge

# what `snakedeploy deploy-workflow <repo> <dir> --tag vX.Y.Z` writes, with the module's snakefile
# a local clone's (github(...) for a tag fetches the same file)
PROJECT_SNAKEFILE = """\
configfile: "config/config.yaml"


module medfold:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from medfold
"""

SMALL = {
    **TRAINING_ONLY,
    "experiments": {"small": {}},
    "split": {"folds": 2},
    "training": {"epochs": 1, "early_stopping": {"enabled": False}},
    "evaluation": {"bootstrap": 100},
}


@pytest.mark.workflow
def test_the_workflow_runs_as_a_module_of_another_project(tmp_path):
    project = tmp_path / "my_project"
    (project / "workflow").mkdir(parents=True)
    (project / "config").mkdir()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key in ("experiments", "variants", "ensembles", "external"):
        config.pop(key, None)
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(merge(config, SMALL), sort_keys=False))
    (project / "workflow" / "Snakefile").write_text(PROJECT_SNAKEFILE.format(snakefile=REPO / "workflow" / "Snakefile"))
    before = sorted(p.name for p in REPO.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2"],  # the project's own workflow/Snakefile
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = project / "results" / "demo_cxr14"
    page = (results / "report" / "index.html").read_text()
    assert "small" in page and "leak-free" in page
    for fold in (0, 1):
        assert (results / "small" / f"fold_{fold}" / "model.pt").is_file()
    assert (project / "resources" / "demo" / "cxr14" / "Data_Entry.csv").is_file()  # the demo data is the project's
    assert sorted(p.name for p in REPO.iterdir()) == before  # nothing written beside the workflow
