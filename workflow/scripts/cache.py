from medfold import step
from medfold.cache import build_cache
from medfold.index import read_index


def main(s):
    index, _ = read_index(s.input.index)
    build_cache(index, s.output.images.rsplit("/", 1)[0], int(s.wildcards.size), s.params.channels, s.threads)


step.run(snakemake, main)
