# Combinations: several tasks' QLoRA adapters combined into one adapter (config key
# `combinations`, qlora_pipeline/analysis/combine.py), scored by the evaluate rule on each of
# its tasks as the variant combined+<name>, beside every task's adapter on every other task.


rule combine_adapters:
    input:
        adapters=lambda wc: [layout.adapter(t, layout.COMBINED_FROM)
                             for t in combination_cfg(wc)["tasks"]],
    output:
        combined=directory(layout.combination("{combination}")),
    params:
        combination=combination_cfg,
        seed=config["seed"],
        code=code("combine_adapters"),
    wildcard_constraints:
        combination=one_of(COMBINATIONS),
    threads: MODEL_THREADS
    log:
        f"{RESULTS}/logs/combine_adapters/{{combination}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/combine_adapters/{{combination}}.tsv"
    conda:
        "../envs/torch.yaml"
    # The pruning methods' dense SVD per layer runs on the GPU when there is one.
    resources:
        gpu=1,
    script:
        STAGE
