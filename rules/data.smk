# Dataset stages: fetch each task's examples, then tokenize them with the base tokenizer.


rule fetch_dataset:
    input:
        local_dataset_files,
    output:
        directory(f"{RESULTS}/data/{{task}}/raw"),
    params:
        dataset=lambda wc: task_cfg(wc)["dataset"],
        format=lambda wc: task_cfg(wc)["format"],
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/fetch_dataset/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_dataset/{{task}}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/fetch_dataset.py"


rule tokenize:
    input:
        raw=f"{RESULTS}/data/{{task}}/raw",
        base=f"{RESULTS}/models/base",
    output:
        directory(f"{RESULTS}/data/{{task}}/tokenized"),
    params:
        format=lambda wc: task_cfg(wc)["format"],
        tokenize=lambda wc: task_cfg(wc)["tokenize"],
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/tokenize/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize/{{task}}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/tokenize.py"
