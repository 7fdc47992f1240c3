"""medfold.settings.resolve: the whole config resolved once, every cross-key check in the
library, called directly (no Snakemake)."""

import pytest
from conftest import SCHEMA, resolved_config

from medfold.errors import ConfigError
from medfold.settings import Study, resolve


def test_the_demo_config_resolves_to_its_experiments_folds_and_jobs():
    study = resolve(resolved_config(), SCHEMA)
    assert isinstance(study, Study)
    assert study.experiments == ("baseline", "batchnorm", "sweep_lr~0.003", "sweep_lr~0.01")
    assert study.grids == {"sweep": {"sweep_lr~0.003": {"lr": 0.003}, "sweep_lr~0.01": {"lr": 0.01}}}
    assert study.folds == (0, 1, 2)
    assert study.experiment_folds == dict.fromkeys(study.experiments, [0, 1, 2])
    assert study.settings["sweep_lr~0.01"]["lr"] == 0.01 and study.settings["batchnorm"]["batch_norm"]
    assert study.compressed == ("batchnorm",) and study.compressed_folds == (0,)
    assert study.explained == ("batchnorm",) and study.explained_folds == (0,)
    assert study.compared == (*study.experiments, "baseline_and_batchnorm")
    # the subgroups' columns travel into the index with the table's own metadata columns
    assert {"Patient Age", "Patient Gender", "View Position"} <= set(study.index_dataset["metadata_columns"])
    assert study.train_resources["baseline"]["tasks"] == 1
    with pytest.raises(AttributeError):
        study.folds = (0,)  # frozen


def test_folds_of_one_experiment_limit_what_it_trains_and_what_may_use_it():
    study = resolve(resolved_config({"experiments": {"sweep": {"folds": [0]}}, "compression": {"folds": [0]}}), SCHEMA)
    assert study.experiment_folds["sweep_lr~0.01"] == [0]
    assert study.experiment_folds["baseline"] == [0, 1, 2]


def test_init_from_gives_the_source_fold_model_path():
    config = resolved_config({"experiments": {"tuned": {"init_from": {"experiment": "baseline", "fold": 1}}}})
    study = resolve(config, SCHEMA)
    assert study.init_from["tuned"] == f"{study.results}/demo_cxr14/baseline/fold_1/model.pt"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"split": {"folds": 1}}, r"split\.folds is 1; split\.method 'stratified' needs at least 2"),
        (
            {"split": {"method": "manifest", "manifest": "nowhere.csv"}},
            r"split\.manifest: 'nowhere\.csv' is not a file",
        ),
        (
            {"experiments": {"baseline": {"folds": "0"}}},
            r"experiments\.baseline\.folds: expected a list of fold numbers",
        ),
        ({"experiments": {"baseline": {"folds": [5]}}}, r"experiments\.baseline\.folds: folds \[5\] do not exist"),
        ({"ensembles": {"pair": {"experiments": ["baseline", "nope"]}}}, r"ensembles\.pair\.experiments: \['nope'\]"),
        (
            {"ensembles": {"baseline": {"experiments": ["batchnorm", "baseline"]}}},
            r"ensembles\.baseline: the name is an experiment's",
        ),
        (
            {"experiments": {"baseline": {"folds": [0]}}},
            r"ensembles\.baseline_and_batchnorm\.experiments: experiment 'baseline' trains on folds \[0\] only",
        ),
        ({"evaluation": {"comparisons": {"reference": "nope"}}}, r"evaluation\.comparisons\.reference: \['nope'\]"),
        ({"evaluation": {"comparisons": {"pairs": [["baseline", "x"]]}}}, r"evaluation\.comparisons\.pairs: \['x'\]"),
        ({"reference": {"experiments": {"nope": {}}}}, r"reference\.experiments\.nope: neither an experiment"),
        ({"explain": {"experiments": ["nope"]}}, r"explain\.experiments: \['nope'\] are not experiments"),
        ({"explain": {"folds": [7]}}, r"explain\.folds: folds \[7\] do not exist"),
        ({"export": {"experiments": ["nope"]}}, r"export\.experiments: \['nope'\] are not experiments"),
        ({"compression": {"experiments": ["nope"]}}, r"compression\.experiments: \['nope'\] are not experiments"),
        (
            {
                "experiments": {"batchnorm": {"folds": [1]}},
                "explain": {"folds": [1]},
                "ensembles": {"baseline_and_batchnorm": {"experiments": ["baseline", "sweep_lr~0.01"]}},
            },
            r"compression\.experiments: experiment 'batchnorm' trains on folds \[1\] only",
        ),
        (
            {
                "dataset": {"format": "folders", "root": "x"},
                "evaluation": {"subgroups": [{"column": "Age", "name": "a"}]},
            },
            r"evaluation\.subgroups / dataset\.metadata_columns name .*'Age'",
        ),
        (
            {"experiments": {"spread": {"distributed": {"backend": "ddp", "gpus": 3, "nodes": 2}}}},
            r"experiments\.spread\.distributed\.nodes: 2 nodes",
        ),
        (
            {
                "experiments": {
                    "spread": {"distributed": {"backend": "ddp", "gpus": 2, "nodes": 2, "launcher": "local"}}
                }
            },
            r"experiments\.spread\.distributed\.launcher: 'local' starts processes on this machine only",
        ),
        ({"experiments": {"baseline": {"model": "no_such_net"}}}, r"experiments\.baseline\.model: 'no_such_net'"),
    ],
)
def test_each_cross_key_error_names_its_key(overrides, message):
    config = resolved_config(overrides)
    with pytest.raises(ConfigError, match=message):
        resolve(config, SCHEMA)
