# Training stages, for every row of the trainings table (a task's own training, each sweep
# point): a QLoRA adapter, its optional full-precision recovery; the promotion of a sweep's
# chosen point to the task's own adapters; and the merge of a task's final adapter.
# `{name}` is the adapter's (qlora, recovered, qlora@<training>, recovered@<point>).
# A training's retries: rules/common.smk (retry_trainings_on_a_cluster).


rule train_qlora:
    input:
        quantized=quantized_base,
        tokenized=layout.tokenized("{task}"),
        base=loftq_source,
    output:
        adapter=directory(layout.adapter("{task}", "{name}")),
    params:
        lora=lambda wc: training(wc)["lora"],
        train=lambda wc: training(wc)["train"],
        seed=lambda wc: training(wc)["seed"],
        checkpoints=layout.checkpoints("{task}", "{name}"),
        trackers=trackers,
        code=code("train_qlora"),
    wildcard_constraints:
        name=one_of(adapter_names(["qlora"])),
    threads: training_threads
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/train_qlora/{{task}}/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_qlora/{{task}}/{{name}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=training_gpus,
        nodes=training_nodes,
    script:
        STAGE


rule recover:
    input:
        base=BASE,
        qlora=trained_from,
        tokenized=layout.tokenized("{task}"),
    output:
        adapter=directory(layout.adapter("{task}", "{name}")),
    params:
        # What the job trains with: the row's train block with recovery's steps and rate.
        train=lambda wc: recovery_train(training(wc)),
        seed=lambda wc: training(wc)["seed"],
        checkpoints=layout.checkpoints("{task}", "{name}"),
        trackers=trackers,
        code=code("recover"),
    wildcard_constraints:
        name=one_of(adapter_names(["recovered"])),
    threads: training_threads
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/recover/{{task}}/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/recover/{{task}}/{{name}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=training_gpus,
        nodes=training_nodes,
    script:
        STAGE


# `sweep.promote: best`: the chosen point's adapters become the task's own (qlora, and
# recovered when the points are recovered), so the task's merge, analyses and evaluations
# follow them; it wins over the task's own training (ruleorder) only for a promoting task.
ruleorder: promote_sweep_point > train_qlora
ruleorder: promote_sweep_point > recover


rule promote_sweep_point:
    input:
        results=lambda wc: [layout.evaluation(trainings.adapter_name(
            row, sweep_table(wc.task)["compare"]), wc.task)["results"]
            for row in points(wc.task).values()],
        adapters=lambda wc: [layout.adapter(wc.task, trainings.adapter_name(row, wc.name))
                             for row in points(wc.task).values()],
        # what the choice reads of every point's QLoRA training (its size)
        trainings=lambda wc: [layout.adapter(wc.task, name) for name in
                              trainings.adapters(points(wc.task), ["qlora"])],
    output:
        adapter=directory(layout.adapter("{task}", "{name}")),
    params:
        table=lambda wc: sweep_table(wc.task),
        code=code("promote_sweep_point"),
    wildcard_constraints:
        task=one_of([t for t in TASKS if promoted(t)]),
        name=one_of(layout.TRAINED),
    threads: DATA_THREADS
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/promote_sweep_point/{{task}}/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/promote_sweep_point/{{task}}/{{name}}.tsv"
    conda:
        "../envs/report.yaml"
    script:
        STAGE


rule merge:
    input:
        base=BASE,
        quantized=lambda wc: own_quantized(wc.task),
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
        STAGE
