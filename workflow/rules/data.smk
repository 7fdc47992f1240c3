# Demo data, indexing, patient-level splitting and the leakage check.


# The demo's forms, one rule each, so a config makes only the forms its datasets read.
DEMO_SIZES = dict(
    seed=STUDY.demo.seed,
    cxr14_patients=STUDY.demo.cxr14_patients,
    folder_patients=STUDY.demo.folder_patients,
    dicom_patients=STUDY.demo.dicom_patients,
)


rule demo_cxr14:
    output:
        table=f"{STUDY.demo.output}/cxr14/Data_Entry.csv",
        images=directory(f"{STUDY.demo.output}/cxr14/images"),
    log:
        f"{STUDY.demo.output}/logs/demo_cxr14.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        **DEMO_SIZES,
        out=lambda wildcards, output: Path(output.table).parent.parent,
        form="cxr14",
    script:
        "../scripts/demo_data.py"


use rule demo_cxr14 as demo_folders with:
    output:
        directory(f"{STUDY.demo.output}/chest_xray"),
    log:
        f"{STUDY.demo.output}/logs/demo_folders.log",
    params:
        **DEMO_SIZES,
        out=lambda wildcards, output: Path(output[0]).parent,
        form="chest_xray",


use rule demo_cxr14 as demo_dicom with:
    output:
        directory(f"{STUDY.demo.output}/dicom"),
    log:
        f"{STUDY.demo.output}/logs/demo_dicom.log",
    params:
        **DEMO_SIZES,
        out=lambda wildcards, output: Path(output[0]).parent,
        form="dicom",


# a second site: copies of cxr14's films are planted in it
use rule demo_cxr14 as demo_site_b with:
    input:
        rules.demo_cxr14.output.table,
    output:
        table=f"{STUDY.demo.output}/site_b/Data_Entry.csv",
        images=directory(f"{STUDY.demo.output}/site_b/images"),
    log:
        f"{STUDY.demo.output}/logs/demo_site_b.log",
    params:
        **DEMO_SIZES,
        out=lambda wildcards, output: Path(output.table).parent.parent,
        form="site_b",


rule index:
    input:
        unpack(dataset_inputs),
    output:
        table=f"{RESULTS}/{{dataset}}/index.parquet",
        report=f"{RESULTS}/{{dataset}}/index_report.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/index.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/index.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: STUDY.resources.index_threads
    resources:
        **site_resources(),
        mem_mb=4000,
        runtime=120,
    params:
        dataset=INDEX_DATASET,
        identifiers=STUDY.privacy.identifiers,
        results=lambda wildcards, output: Path(output.table).parents[1],
    script:
        "../scripts/index.py"


rule split:
    input:
        unpack(manifest_input),
        index=rules.index.output.table,
    output:
        splits=f"{RESULTS}/{{dataset}}/splits.parquet",
        summary=f"{RESULTS}/{{dataset}}/split_summary.json",
        manifest=f"{RESULTS}/{{dataset}}/split_manifest.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/split.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/split.tsv"
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=4000,
        runtime=30,
    params:
        split=STUDY.split.raw,
        # a refused split's crossing images by their real names: beside the privacy key
        refused=lambda wildcards, output: Path(output.splits).parents[1]
        / f"split_refused_{wildcards.dataset}.csv",
    script:
        "../scripts/split.py"


rule check_split:
    input:
        index=rules.index.output.table,
        report=rules.index.output.report,
        splits=rules.split.output.splits,
    output:
        check=f"{RESULTS}/{{dataset}}/split_check.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/check_split.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/check_split.tsv"
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/check_split.py"
