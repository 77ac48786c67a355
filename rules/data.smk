# Dataset stages: fetch each task's examples, then tokenize them with the base tokenizer.


rule fetch_dataset:
    input:
        files=local_dataset_files,
    output:
        raw=directory(layout.raw("{task}")),
    params:
        dataset=lambda wc: task_cfg(wc)["dataset"],
        format=lambda wc: task_cfg(wc)["format"],
        code=code("fetch_dataset"),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/fetch_dataset/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_dataset/{{task}}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        STAGE


rule tokenize:
    input:
        raw=layout.raw("{task}"),
        base=BASE,
    output:
        tokenized=directory(layout.tokenized("{task}")),
    params:
        format=lambda wc: task_cfg(wc)["format"],
        tokenize=lambda wc: task_cfg(wc)["tokenize"],
        code=code("tokenize"),
    threads: DATA_THREADS
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/tokenize/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize/{{task}}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        STAGE
