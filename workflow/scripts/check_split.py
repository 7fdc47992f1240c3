import json
from pathlib import Path

import pandas as pd

from medfold import step
from medfold.index import read_index
from medfold.privacy import shareable_view, shared_splits
from medfold.split import check_split, write_json


def main(s):
    index, _ = read_index(s.input.index)
    near = json.loads(Path(s.input.report).read_text()).get("near_duplicates", {})  # in shared IDs
    check = check_split(
        shareable_view(index), shared_splits(index, pd.read_parquet(s.input.splits)), near.get("pair_list")
    )
    write_json(check, s.output.check)


step.run(snakemake, main)
