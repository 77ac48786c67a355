# Model stages: import the base model once, quantize it to 4 bits, measure what that cost.


rule import_base_model:
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        base_model=config["base_model"],
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/import_base_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/import_base_model.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/import_base_model.py"


rule quantize:
    input:
        f"{RESULTS}/models/base",
    output:
        directory(f"{RESULTS}/models/base-4bit"),
    params:
        quantization=config["quantization"],
        seed=config["seed"],
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/quantize.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/quantize.py"


rule quantization_report:
    input:
        base=f"{RESULTS}/models/base",
        quantized=f"{RESULTS}/models/base-4bit",
        tokenized=list(tokenized_dirs().values()),
    output:
        json=f"{RESULTS}/quantization/report.json",
        md=f"{RESULTS}/quantization/report.md",
        provenance=f"{RESULTS}/quantization/provenance.json",
    params:
        report=config["quantization_report"],
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
        "../scripts/quantization_report.py"
