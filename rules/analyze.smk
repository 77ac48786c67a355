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
