# The report: every score in one table, per-task tables, training curves and merge checks.
# Outputs are flagged for `snakemake --report report.html`.


rule report:
    input:
        results=eval_results(),
        adapters=all_adapters(),
        merged=expand(f"{RESULTS}/models/merged/{{task}}", task=TASKS),
        quantization=f"{RESULTS}/quantization/report.md",
    output:
        scores=report(
            f"{RESULTS}/report/scores.csv",
            caption="../report/scores.rst",
            category="Scores",
        ),
        markdown=report(
            f"{RESULTS}/report/report.md",
            caption="../report/report.rst",
            category="Scores",
        ),
        scores_plot=report(
            f"{RESULTS}/report/scores.png",
            caption="../report/scores_plot.rst",
            category="Scores",
        ),
        loss_plot=report(
            f"{RESULTS}/report/loss.png",
            caption="../report/loss_plot.rst",
            category="Training",
        ),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report.py"
