import shutil

import pytest
import yaml
from conftest import REPO, SCHEMA, resolved_config
from snakemake.exceptions import WorkflowError

from medfold.settings.schema_doc import schema_keys, update


def test_every_key_has_a_description_and_a_default():
    schema = yaml.safe_load(SCHEMA.read_text())
    missing = [key for key, prop in schema_keys(schema) if "description" not in prop or "default" not in prop]
    assert missing == []


@pytest.mark.parametrize("page", ["config/README.md", "docs/reference.md"])
def test_config_readme_documents_the_current_schema(tmp_path, page):
    readme = tmp_path / "page.md"
    shutil.copy(REPO / page, readme)
    assert not update(SCHEMA, readme), (
        f"{page} is stale: run python -m medfold.settings.schema_doc "
        "workflow/schemas/config.schema.yaml config/README.md docs/reference.md"
    )
    text = readme.read_text()
    for key, _ in schema_keys(yaml.safe_load(SCHEMA.read_text())):
        assert f"`{key}`" in text


def test_empty_config_gets_every_default():
    config = resolved_config(base=None)
    assert config["split"]["folds"] == 3 and config["dataset"]["format"] == "folders"
    # nothing of the demo: a config of one's own starts from neutral defaults
    assert config["dataset"]["labels"] == [] and config["dataset"]["root"] is None
    assert config["experiments"] == {"baseline": {}} and config["variants"] == {} and config["ensembles"] == {}
    assert config["explain"]["experiments"] == []


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"split": {"folds": 0}}, "0 is less than the minimum of 1"),
        ({"dataset": {"format": "parquet"}}, "'parquet' is not one of"),
        ({"dataset": {"patient_colum": "x"}}, "Additional properties are not allowed ('patient_colum'"),
        ({"split": {"test_fraction": 1.5}}, "greater than or equal to the maximum of 1"),
    ],
)
def test_schema_rejects_bad_values_with_the_key(overrides, fragment):
    with pytest.raises(WorkflowError) as err:
        resolved_config(overrides)
    assert fragment in str(err.value)
