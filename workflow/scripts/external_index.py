from pathlib import Path

from medfold import step
from medfold.external import index_external


def main(s):
    p, out = s.params, s.output
    cache = Path(out.cache).parent
    index_external(p.dataset, p.results, p.identifiers, out.table, out.report, cache, p.size, p.channels, s.threads)


step.run(snakemake, main)
