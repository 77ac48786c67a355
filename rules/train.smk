# Training stages: a QLoRA adapter per task, an optional full-precision recovery of it,
# and the merge of the task's final adapter into a standalone model.


rule train_qlora:
    input:
        quantized=layout.QUANTIZED,
        tokenized=layout.tokenized("{task}"),
    output:
        adapter=directory(layout.adapter("{task}", "qlora")),
    params:
        lora=lambda wc: task_cfg(wc)["lora"],
        train=lambda wc: task_cfg(wc)["train"],
        seed=config["seed"],
        checkpoints=layout.checkpoints("{task}", "qlora"),
        tensorboard=layout.tensorboard("{task}", "qlora"),
        code=code("train_qlora"),
    wildcard_constraints:
        task=NOT_PROMOTED,  # a promoting task's comes from its sweep (rules/sweep.smk)
    threads: training_threads(task_cfg)
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/train_qlora/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_qlora/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=training_gpus(task_cfg),
        nodes=training_nodes(task_cfg),
    script:
        "../scripts/train_qlora.py"


rule recover:
    input:
        base=layout.BASE,
        qlora=layout.adapter("{task}", "qlora"),
        tokenized=layout.tokenized("{task}"),
    output:
        adapter=directory(layout.adapter("{task}", "recovered")),
    params:
        # What the job trains with: the task's train block with recovery's steps and rate.
        train=lambda wc: recovery_train(task_cfg(wc)),
        seed=config["seed"],
        checkpoints=layout.checkpoints("{task}", "recovered"),
        tensorboard=layout.tensorboard("{task}", "recovered"),
        code=code("recover"),
    wildcard_constraints:
        task=NOT_PROMOTED,  # a promoting task's comes from its sweep (rules/sweep.smk)
    threads: training_threads(task_cfg)
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/recover/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/recover/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=training_gpus(task_cfg),
        nodes=training_nodes(task_cfg),
    script:
        "../scripts/recover.py"


rule merge:
    input:
        base=layout.BASE,
        quantized=layout.QUANTIZED,
        adapter=final_adapter,
        tokenized=layout.tokenized("{task}"),
    output:
        merged=directory(layout.merged("{task}")),
    params:
        merge=lambda wc: task_cfg(wc)["merge"],
        recovered=lambda wc: recovery_enabled(wc.task),
        code=code("merge"),
    threads: MODEL_THREADS
    priority: TRAINING_PRIORITY
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
