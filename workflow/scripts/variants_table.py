from medfold.compression.compress import VariantsTableOutputs, variants_table_job
from medfold.core import step


def main(s):
    outputs = VariantsTableOutputs.from_rule(s.output)  # each file where the rule says
    variants_table_job(s.input.records, s.params.variants, s.input.summaries, s.input.base_summary, outputs)


step.run(snakemake, main)
