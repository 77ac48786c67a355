# The report: every score in one table, then each section of report.md with its CSV and plot
# (qlora_pipeline/report/sections.py). Outputs are flagged for `snakemake --report report.html`.


rule report:
    input:
        files=lambda wc: list(dict.fromkeys(f for fs in report_sections().values() for f in fs)),
    output:
        **{name: report(path, caption=f"../report/{name}.rst", category=REPORT_FILES[name][1])
           for name, path in report_files().items()},
        provenance=f"{layout.report()}/provenance.json",
    params:
        sections=report_sections(),
        tables=report_tables(),
        code=code("report"),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/report.yaml"
    script:
        STAGE
