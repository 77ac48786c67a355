# Training stages: a QLoRA adapter per task, an optional full-precision recovery of it,
# and the merge of the task's final adapter into a standalone model.


rule train_qlora:
    input:
        base_4bit=f"{RESULTS}/models/base-4bit",
        tokenized=f"{RESULTS}/data/{{task}}/tokenized",
    output:
        directory(f"{RESULTS}/adapters/{{task}}/qlora"),
    params:
        lora=lambda wc: task_cfg(wc)["lora"],
        train=lambda wc: task_cfg(wc)["train"],
        seed=config["seed"],
        # Outside the declared output: Snakemake deletes outputs before a rerun, and these
        # must survive an interrupted job so that it can resume.
        checkpoints=f"{RESULTS}/checkpoints/{{task}}/qlora",
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/train_qlora/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_qlora/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/train_qlora.py"


rule recover:
    input:
        base=f"{RESULTS}/models/base",
        adapter=f"{RESULTS}/adapters/{{task}}/qlora",
        tokenized=f"{RESULTS}/data/{{task}}/tokenized",
    output:
        directory(f"{RESULTS}/adapters/{{task}}/recovered"),
    params:
        recovery=lambda wc: task_cfg(wc)["recovery"],
        train=lambda wc: task_cfg(wc)["train"],
        seed=config["seed"],
        checkpoints=f"{RESULTS}/checkpoints/{{task}}/recovered",
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/recover/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/recover/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/recover.py"


rule merge:
    input:
        base=f"{RESULTS}/models/base",
        base_4bit=f"{RESULTS}/models/base-4bit",
        adapter=final_adapter,
        tokenized=f"{RESULTS}/data/{{task}}/tokenized",
    output:
        directory(f"{RESULTS}/models/merged/{{task}}"),
    params:
        merge=lambda wc: task_cfg(wc)["merge"],
        recovered=lambda wc: recovery_enabled(wc.task),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/merge/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/merge.py"
