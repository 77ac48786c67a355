# Evaluation: each task's test split as an lm-eval task, then one job per variant × task
# (any variant: a task's own models, another task's, a combination, a sweep point's adapter),
# so that adding a variant or a benchmark reruns nothing else.


rule eval_task_spec:
    input:
        raw=layout.raw("{task}"),
        base=BASE,
    output:
        spec=directory(layout.eval_spec("{task}")),
    params:
        format=lambda wc: task_cfg(wc)["format"],
        max_gen_tokens=config["evaluation"]["max_gen_tokens"],
        scoring=lambda wc: task_cfg(wc)["scoring"],
        code=code("eval_task_spec"),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/eval_task_spec/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_task_spec/{{task}}.tsv"
    conda:
        "../envs/eval.yaml"
    script:
        STAGE


rule evaluate:
    input:
        unpack(variant_inputs),
    output:
        **layout.evaluation("{variant}", "{task}"),
    params:
        evaluation=eval_settings,
        seed=config["seed"],
        code=code("evaluate"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/evaluate/{{variant}}/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{variant}}/{{task}}.tsv"
    conda:
        "../envs/eval.yaml"
    resources:
        gpu=1,
    script:
        STAGE
