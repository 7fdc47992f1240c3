from medfold import step
from medfold.compress import variants_tables


def main(s):
    table, summary = variants_tables(
        s.input.records, dict(zip(s.params.variants, s.input.summaries)), s.input.base_summary
    )
    table.to_csv(s.output.table, index=False)
    summary.to_csv(s.output.summary, index=False)


step.run(snakemake, main)
