import pandas as pd

from medfold import step
from medfold.index import read_index
from medfold.split import check_split, write_json


def main(s):
    index, _ = read_index(s.input.index)
    write_json(check_split(index, pd.read_parquet(s.input.splits)), s.output.check)


step.run(snakemake, main)
