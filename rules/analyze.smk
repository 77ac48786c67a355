# Adapter analysis: the spectrum of every trained adapter's update ΔW (each task's own, each
# sweep's QLoRA trainings), layer by layer, against the base it was trained on (qlora: the
# dequantized 4-bit base; recovered: the full base).


rule analyze_adapter:
    input:
        adapter=layout.adapter("{task}", "{name}"),
        base=lambda wc: layout.trained_base(wc.name,
                                            trainings.own_base(TRAININGS, wc.name, wc.task)),
    output:
        analysis=directory(layout.analysis("{task}", "{name}")),
    params:
        settings=config["analysis"],
        code=code("analyze_adapter"),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/analyze_adapter/{{task}}/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analyze_adapter/{{task}}/{{name}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        STAGE


# Compression: a task's QLoRA adapter cut to its best lower-rank approximation (task key
# `compress`), scored as the `compressed` variant. Small work on the CPU (r×r SVDs).
rule compress_adapter:
    input:
        adapter=layout.adapter("{task}", layout.COMPRESSED_FROM),
    output:
        compressed=directory(layout.adapter("{task}", "compressed")),
    params:
        settings=lambda wc: task_cfg(wc)["compress"],
        code=code("compress_adapter"),
    threads: DATA_THREADS
    log:
        f"{RESULTS}/logs/compress_adapter/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/compress_adapter/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        STAGE
