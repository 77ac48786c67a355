# Adapter analysis: the spectrum of every trained adapter's update ΔW, layer by layer, against
# the base it was trained on (qlora: the dequantized 4-bit base; recovered: the full base).


rule analyze_adapter:
    input:
        adapter=layout.adapter("{task}", "{kind}"),
        base=lambda wc: layout.trained_base(wc.kind),
    output:
        analysis=directory(layout.analysis("{task}", "{kind}")),
    params:
        settings=config["analysis"],
        code=code("analyze_adapter"),
    wildcard_constraints:
        kind="|".join(layout.ADAPTERS),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/analyze_adapter/{{task}}/{{kind}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analyze_adapter/{{task}}/{{kind}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        "../scripts/analyze_adapter.py"


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
        "../scripts/compress_adapter.py"
