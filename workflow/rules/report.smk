# The HTML report, rendered from result files alone.
REPORT_INPUTS = report_inputs()


rule report:
    input:
        REPORT_INPUTS.paths(),
    output:
        html=report(
            f"{RESULTS}/{{dataset}}/report/index.html",
            caption="../report/medfold_report.rst",
            category="Report",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/report.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=2000,
        runtime=10,
    params:
        files=REPORT_INPUTS,
        config=config,
        repo=str(WORKFLOW_DIR.parent),
    script:
        "../scripts/report.py"
