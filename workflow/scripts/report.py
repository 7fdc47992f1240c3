from medfold.core import step
from medfold.report.page import ReportOutputs, report_job

step.run(
    snakemake,
    lambda s: report_job(s.params.files, s.params.config, s.params.repo, ReportOutputs.from_rule(s.output)),
)
