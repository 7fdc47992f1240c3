from medfold.core import step
from medfold.data.demo import generate_demo

step.run(
    snakemake,
    lambda s: generate_demo(
        s.params.out, s.params.cxr14_patients, s.params.folder_patients, s.params.seed, s.params.dicom_patients
    ),
)
