# medfold: patient-level cross-validated deep learning on medical images.
# This file is the table of contents; each stage lives in workflow/rules/.
import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# medfold's own code, importable by this process and by every job, also where the job's
# environment installs the dependencies alone (--sdm conda with envs/medfold.yaml, or a venv on
# a shared file system without medfold installed)
MEDFOLD_SRC = os.path.join(workflow.basedir, "src")
if MEDFOLD_SRC not in sys.path:
    sys.path.insert(0, MEDFOLD_SRC)
if MEDFOLD_SRC not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    # set, not required: the envvars directive (which the linter asks for) is for variables
    # the user must provide
    os.environ.update(
        PYTHONPATH=os.pathsep.join(
            p for p in (MEDFOLD_SRC, os.environ.get("PYTHONPATH")) if p
        )
    )


# The demo, unless a config of one's own is given (--configfile): then that config and the
# schema's defaults are all there is, so it runs exactly what it names (config/README.md).
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/report_inputs.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/explain.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
