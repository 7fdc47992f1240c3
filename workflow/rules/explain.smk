# Explanations of fold models on held-out test images: Grad-CAM and LIME (captum).


rule explain:
    input:
        model=rules.train.output.model,
        index=rules.index.output.table,
        splits=rules.split.output.splits,
        cache=lambda w: cache_of(w.experiment),
    output:
        record=f"{FOLD_DIR}/explanations/explanations.json",
        maps=f"{FOLD_DIR}/explanations/maps.npz",
        overlays=directory(f"{FOLD_DIR}/explanations/overlays"),
    log:
        f"{FOLD_DIR}/explanations/explain.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/explain_{{experiment}}_fold_{{fold}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: lambda w: TRAINING[w.experiment].threads
    resources:
        **site_resources(),
        mem_mb=STUDY.explain.mem_mb,
        runtime=STUDY.explain.runtime,
    params:
        explain=STUDY.explain.raw,
    script:
        "../scripts/explain.py"
