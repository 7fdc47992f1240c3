from medfold.core import step
from medfold.deploy.external import ExternalIndexOutputs, external_index_job


def main(s):
    p = s.params
    outputs = ExternalIndexOutputs.from_rule(s.output)  # each file where the rule says
    external_index_job(p.dataset, p.results, p.identifiers, p.size, p.channels, outputs, s.threads)


step.run(snakemake, main)
