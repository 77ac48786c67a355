# Sweeps: every point of a task's `sweep:` block (qlora_pipeline/sweeps.py) is its own training,
# scoring and analysis, so that extending the grid runs only the new points and a point's jobs
# are scheduled like any other (one per GPU; one Slurm job each). Points that differ only in
# recovery keys share one QLoRA training; `{point}` names that training in the rules of it.


rule train_sweep_point:
    input:
        quantized=layout.QUANTIZED,
        tokenized=layout.tokenized("{task}"),
    output:
        adapter=directory(layout.sweep_adapter("{task}", "{point}")),
    params:
        lora=lambda wc: training_cfg(wc)["lora"],
        train=lambda wc: training_cfg(wc)["train"],
        seed=lambda wc: training_cfg(wc)["seed"],
        settings=lambda wc: training_cfg(wc)["settings"],
        checkpoints=layout.sweep_checkpoints("{task}", "{point}"),
        tensorboard=layout.tensorboard("{task}", "qlora", "{point}"),
        code=code("train_sweep_point"),
    threads: training_threads(training_cfg)
    log:
        f"{RESULTS}/logs/train_sweep_point/{{task}}/{{point}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_sweep_point/{{task}}/{{point}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=training_gpus(training_cfg),
        nodes=training_nodes(training_cfg),
    script:
        "../scripts/train_sweep_point.py"


rule recover_sweep_point:
    input:
        base=layout.BASE,
        qlora=lambda wc: point_adapter(wc.task, wc.point, "qlora"),
        tokenized=layout.tokenized("{task}"),
    output:
        adapter=directory(layout.sweep_adapter("{task}", "{point}", "recovered")),
    params:
        # The task's recovery, with the point's train block and swept recovery keys.
        train=lambda wc: recovery_train(point_cfg(wc)),
        seed=lambda wc: point_cfg(wc)["seed"],
        settings=lambda wc: point_cfg(wc)["settings"],
        checkpoints=layout.sweep_checkpoints("{task}", "{point}", "recovered"),
        tensorboard=layout.tensorboard("{task}", "recovered", "{point}"),
        code=code("recover_sweep_point"),
    threads: training_threads(point_cfg)
    log:
        f"{RESULTS}/logs/recover_sweep_point/{{task}}/{{point}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/recover_sweep_point/{{task}}/{{point}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=training_gpus(point_cfg),
        nodes=training_nodes(point_cfg),
    script:
        "../scripts/recover_sweep_point.py"


rule evaluate_sweep_point:
    input:
        unpack(point_inputs),
    output:
        **layout.sweep_evaluation("{task}", "{point}", "{variant}"),
    params:
        evaluation=eval_settings,
        seed=config["seed"],
        code=code("evaluate_sweep_point"),
    wildcard_constraints:
        variant=one_of(sweeps.VARIANTS),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/evaluate_sweep_point/{{task}}/{{point}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_sweep_point/{{task}}/{{point}}/{{variant}}.tsv"
    conda:
        "../envs/eval.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/evaluate_sweep_point.py"


rule analyze_sweep_point:
    input:
        adapter=layout.sweep_adapter("{task}", "{point}"),
        base=layout.QUANTIZED,
    output:
        analysis=directory(layout.sweep_analysis("{task}", "{point}")),
    params:
        settings=config["analysis"],
        code=code("analyze_sweep_point"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/analyze_sweep_point/{{task}}/{{point}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analyze_sweep_point/{{task}}/{{point}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/analyze_sweep_point.py"


# `sweep.promote: best`: the chosen point's adapter becomes the task's own (qlora, and recovered
# when the points are recovered), so the task's merge, analyses and evaluations follow it.
rule promote_sweep_point:
    input:
        results=lambda wc: [layout.sweep_evaluation(wc.task, p, sweeps.selection_variant(
            sweep_cfg(wc.task)))["results"] for p in TASKS[wc.task]["sweep_points"]],
        trainings=lambda wc: [layout.sweep_adapter(wc.task, t) for t in sweep_trainings(wc.task)],
        adapters=lambda wc: [point_adapter(wc.task, p, wc.kind)
                             for p in TASKS[wc.task]["sweep_points"]],
    output:
        adapter=directory(layout.adapter("{task}", "{kind}")),
    params:
        table=lambda wc: sweep_table(wc.task),
        code=code("promote_sweep_point"),
    wildcard_constraints:
        task=PROMOTED,
        kind=one_of(sweeps.VARIANTS),
    threads: DATA_THREADS
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/promote_sweep_point/{{task}}/{{kind}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/promote_sweep_point/{{task}}/{{kind}}.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/promote_sweep_point.py"
