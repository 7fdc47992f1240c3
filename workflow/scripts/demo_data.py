from medfold.core import step
from medfold.data.demo import generate_form

step.run(
    snakemake,
    lambda s: generate_form(
        s.params.out,
        s.params.form,
        s.params.cxr14_patients,
        s.params.folder_patients,
        s.params.seed,
        s.params.dicom_patients,
    ),
)
