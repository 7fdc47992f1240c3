import json
from pathlib import Path

import pandas as pd

from medfold import step
from medfold.index import read_index
from medfold.split import check_split, write_json


def main(s):
    index, _ = read_index(s.input.index)
    near = json.loads(Path(s.input.report).read_text()).get("near_duplicates", {})
    write_json(check_split(index, pd.read_parquet(s.input.splits), near.get("pair_list")), s.output.check)


step.run(snakemake, main)
