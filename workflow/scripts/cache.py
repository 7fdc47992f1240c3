from medfold.core import step
from medfold.data.cache import CacheOutputs, cache_job


def main(s):
    outputs = CacheOutputs.from_rule(s.output)  # each file where the rule says
    cache_job(s.input.index, int(s.wildcards.size), s.params.channels, outputs, s.threads)


step.run(snakemake, main)
