"""A version that means something: one number in pyproject, the package, the changelog's newest
release, the report's provenance and the model card; the catalog's files in place."""

import re
import tomllib

import yaml
from conftest import REPO

import medfold


def test_the_version_is_one_number_everywhere_it_is_written():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert project == medfold.__version__ == released[0], (project, medfold.__version__, released[:1])
    assert "## [Unreleased]" in (REPO / "CHANGELOG.md").read_text()


def test_the_card_and_the_report_say_which_medfold_made_them():
    from medfold.deploy.card import _software
    from medfold.report.experiments import provenance_view

    assert _software()["medfold"] == medfold.__version__
    import pandas as pd

    about = provenance_view({}, pd.DataFrame(), None).about.rows
    assert ["medfold", medfold.__version__] in about


def test_the_catalog_finds_the_layout_it_expects():
    """snakemake-workflow-catalog's standardized usage: workflow/Snakefile, rules/*.smk, config/
    with config.yaml and README.md, and its own description file."""
    assert (REPO / "workflow" / "Snakefile").is_file() and not (REPO / "Snakefile").exists()
    assert list((REPO / "workflow" / "rules").glob("*.smk"))
    assert (REPO / "config" / "config.yaml").is_file() and (REPO / "config" / "README.md").is_file()
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True and catalog["usage"]["report"] is True
    readme = (REPO / "README.md").read_text().lower()
    assert "snakemake" in readme and "workflow" in readme
