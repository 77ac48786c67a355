# Model stages: import the base model once, quantize it, measure what that cost.


rule import_base_model:
    input:
        source=base_model_source,
    output:
        base=directory(BASE),
    params:
        base_model=config["base_model"],
        code=code("import_base_model"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/import_base_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/import_base_model.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        STAGE


rule quantize:
    input:
        base=BASE,
    output:
        quantized=directory(QUANTIZED),
    params:
        quantization=config["quantization"],
        seed=config["seed"],
        code=code("quantize"),
    threads: MODEL_THREADS
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/quantize.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        STAGE


# A training's own quantized base (lora.init pissa, or loftq with iterations > 1), with its
# initial adapter: one per base id of the trainings table (config/trainings.py).
rule quantize_for_training:
    input:
        base=BASE,
    output:
        quantized=directory(layout.training_base("{base}")),
    params:
        quantization=config["quantization"],
        lora=lambda wc: trainings.base_settings(TRAINING_BASES[wc.base]["lora"]),
        seed=lambda wc: TRAINING_BASES[wc.base]["seed"],
        code=code("quantize_for_training"),
    threads: MODEL_THREADS
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/quantize_for_training/{{base}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize_for_training/{{base}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        STAGE


rule quantization_report:
    input:
        base=BASE,
        quantized=QUANTIZED,
        tokenized=[layout.tokenized(task) for task in TASKS],
    output:
        **layout.quantization_report(),
    params:
        tasks=list(TASKS),
        max_examples=config["quantization_report"]["max_examples"],
        code=code("quantization_report"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/quantization_report.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantization_report.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        STAGE


# Only with `quantization_sweep:` entries: each method measured, not trained (the table: a
# section of the report).
rule quantization_sweep_point:
    input:
        base=BASE,
        tokenized=[layout.tokenized(task) for task in TASKS],
    output:
        report=directory(layout.quantization_sweep_point("{qpoint}")),
    params:
        point=lambda wildcards: QUANT_SWEEP[wildcards.qpoint],
        tasks=list(TASKS),
        max_examples=config["quantization_report"]["max_examples"],
        seed=config["seed"],
        code=code("quantization_sweep_point"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/quantization_sweep_point/{{qpoint}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantization_sweep_point/{{qpoint}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        STAGE

