from medfold.core import step
from medfold.data.index.stage import IndexOutputs, index_job

step.run(
    snakemake,
    lambda s: index_job(
        s.params.dataset, s.params.results, s.params.identifiers, IndexOutputs.from_rule(s.output), s.threads
    ),
)
