from pathlib import Path

from medfold import step
from medfold.errors import ConfigError
from medfold.predict import list_images, load_predictor, predict_images


def main(s):
    settings = s.params.predict
    if not settings["images"]:
        raise ConfigError(
            "predict.images: not set; give the folder or CSV of new images, e.g. "
            "--config 'predict={images: new_images/}'"
        )
    experiment = Path(s.input.ensemble).parent.parent  # its fold ensemble, thresholds from its cv/
    predict_images(
        load_predictor(experiment),
        list_images(settings["images"], settings["column"]),
        Path(s.output.table).parent,
        gradcam=settings["gradcam"],
    )


step.run(snakemake, main)
