# Export stage: a task's merged model as GGUF files for llama.cpp, Ollama and LM Studio
# (only for tasks with `export: {gguf: true}`), each checked by two round trips.


# The training chain's priority: after the merge, the export (conversion, quantization, two
# round trips: minutes on a CPU) is the rest of the longest path; at 7e6f744 it waited 2 min
# 16 s behind scorings and then ended `make demo` alone.
rule export_gguf:
    input:
        merged=layout.merged("{task}"),
        spec=layout.eval_spec("{task}"),
    output:
        gguf=directory(layout.gguf("{task}")),
    params:
        export=lambda wc: task_cfg(wc)["export"],
        code=code("export_gguf"),
    threads: MODEL_THREADS
    priority: TRAINING_PRIORITY
    log:
        f"{RESULTS}/logs/export_gguf/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/export_gguf/{{task}}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=1,
    script:
        STAGE
