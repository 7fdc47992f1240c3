from pathlib import Path

from medfold import card, step
from medfold.export import export_onnx


def main(s):
    experiment = Path(s.input.ensemble).parent.parent  # its fold ensemble, thresholds from its cv/
    record = export_onnx(experiment, Path(s.output.onnx).parent, Path(s.output.onnx).name)
    card.write(card.build(experiment, s.params.card, record), Path(s.output.card).parent)


step.run(snakemake, main)
