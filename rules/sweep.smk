# Sweeps: every point of a task's `sweep:` block (qlora_pipeline/sweeps.py) is its own training,
# scoring and analysis, so that extending the grid runs only the new points and a point's jobs
# are scheduled like any other (one per GPU; one Slurm job each).


rule train_sweep_point:
    input:
        quantized=layout.QUANTIZED,
        tokenized=layout.tokenized("{task}"),
    output:
        adapter=directory(layout.sweep_adapter("{task}", "{point}")),
    params:
        lora=lambda wc: point_cfg(wc)["lora"],
        train=lambda wc: point_cfg(wc)["train"],
        seed=lambda wc: point_cfg(wc)["seed"],
        settings=lambda wc: point_cfg(wc)["settings"],
        checkpoints=layout.sweep_checkpoints("{task}", "{point}"),
        code=code("train_sweep_point"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/train_sweep_point/{{task}}/{{point}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_sweep_point/{{task}}/{{point}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/train_sweep_point.py"


rule evaluate_sweep_point:
    input:
        spec=layout.eval_spec("{task}"),
        base=layout.BASE,
        quantized=layout.QUANTIZED,
        adapter=layout.sweep_adapter("{task}", "{point}"),
    output:
        **layout.sweep_evaluation("{task}", "{point}"),
    params:
        evaluation=eval_settings,
        seed=config["seed"],
        code=code("evaluate_sweep_point"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/evaluate_sweep_point/{{task}}/{{point}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_sweep_point/{{task}}/{{point}}.tsv"
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
