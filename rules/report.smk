# The report: every score in one table, per-task tables, training curves and merge checks.
# Outputs are flagged for `snakemake --report report.html`.


rule report:
    input:
        results=all_results(),
        combined=[layout.combination(name) for name in COMBINATIONS],
        adapters=all_adapters(),
        analyses=all_analyses(),
        compressions=all_compressions(),
        sweep_results=all_sweep_results(),
        sweep_adapters=all_sweep_adapters(),
        sweep_analyses=all_sweep_analyses(),
        merged=[layout.merged(task) for task in TASKS],
        exports=all_exports(),
        quantization=quantization_markdown(),
    output:
        scores=report(
            layout.report()["scores"],
            caption="../report/scores.rst",
            category="Scores",
        ),
        markdown=report(
            layout.report()["markdown"],
            caption="../report/report.rst",
            category="Scores",
        ),
        scores_plot=report(
            layout.report()["scores_plot"],
            caption="../report/scores_plot.rst",
            category="Scores",
        ),
        loss_plot=report(
            layout.report()["loss_plot"],
            caption="../report/loss_plot.rst",
            category="Training",
        ),
        adapters_plot=report(
            layout.report()["adapters_plot"],
            caption="../report/adapters_plot.rst",
            category="Adapters",
        ),
        provenance=layout.report()["provenance"],
        # Only with sweep points: the points' table and the score against each swept key.
        **({"sweeps": report(layout.sweep_report()["sweeps"], caption="../report/sweeps.rst",
                             category="Sweeps"),
            "sweeps_plot": report(layout.sweep_report()["sweeps_plot"],
                                  caption="../report/sweeps_plot.rst", category="Sweeps")}
           if sweep_points() else {}),
        # Only with combinations: the task × adapter matrix and the tasks' subspace overlaps.
        **({"combinations": report(layout.combination_report()["combinations"],
                                   caption="../report/combinations.rst", category="Combinations"),
            "overlap_plot": report(layout.combination_report()["overlap_plot"],
                                   caption="../report/overlap_plot.rst", category="Combinations")}
           if COMBINATIONS else {}),
    params:
        sweep_tables={t: sweep_table(t) for t in TASKS if sweep_table(t)},
        combination_table=combination_table(),
        code=code("report"),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report.py"


# Only with `quantization_sweep:` entries: the methods measured (model.smk), in one table.
rule quantization_sweep:
    input:
        quantization_report=layout.quantization_report()["report"],
        quantization_markdown=layout.quantization_report()["markdown"],
        points=[layout.quantization_sweep_point(label) for label in QUANT_SWEEP],
    output:
        **layout.quantization_sweep(),
    params:
        code=code("quantization_sweep"),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/quantization_sweep.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantization_sweep.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/quantization_sweep.py"
