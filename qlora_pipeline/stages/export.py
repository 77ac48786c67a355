"""Stage of rules/export.smk: a task's merged model as GGUF files, written by llama.cpp's own
tools (models/gguf_export.py) and each checked by two round trips (models/gguf_roundtrip.py)."""

from __future__ import annotations

import gc
import logging

from ..core import disk, memory
from ..core.files import write_json
from ..core.policy import Policy
from . import Input, Output

log = logging.getLogger(__name__)


def export_gguf(*, merged: Input, spec: Input, gguf: Output, task: str, export: dict,
                policy: Policy) -> dict:
    """One folder: <task>-<type>.gguf per configured type and export.json (per type: size,
    bits/param, seconds, the importer's and llama.cpp's round trips). A file that does not
    hold the merged model (a tensor beyond its type's rounding, or for a float type llama.cpp
    answering differently on more than 1 - min_agreement of the prompts) fails the job."""
    from transformers import AutoTokenizer

    from ..models import gguf_export, gguf_roundtrip
    from ..models.quantization import load_full_precision

    check, types = export["check"], export["type"]
    gguf_export.converter_dir()  # what is missing is said before anything is loaded
    if check["llama_cpp"] or set(types) - set(gguf_export.CONVERTER_TYPES):
        gguf_export.require_llama_cpp("export")
    prompts = gguf_roundtrip.test_prompts(spec, check["examples"])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    # The round trips hold float32 copies in RAM, whatever the device (memory.estimate).
    memory.check_stage("export_gguf", merged, Policy.cpu(policy.threads), weights="export",
                       seq=max(len(tokenizer(p)["input_ids"]) for p in prompts) +
                       check["max_new_tokens"],
                       remedy="a machine with more RAM: the importer's round trip reads the "
                              "file back in float32 on the CPU")
    disk.check_stage("export_gguf", merged, {gguf: ["gguf"]}, types=tuple(types))
    model = load_full_precision(merged, policy, offload=True).eval()
    parameters = sum(p.numel() for p in model.parameters())
    ref = gguf_roundtrip.reference(model, tokenizer, prompts, check["max_new_tokens"])
    del model
    gc.collect()  # the importer's copy loads next
    files = gguf_export.export(merged, gguf, task, types, policy.threads)
    for gguf_type, entry in files.items():
        entry["bits_per_param"] = round(8 * entry["bytes"] / parameters, 3)
        entry.update(_round_trips(gguf / entry["file"], merged, ref, gguf_type, check,
                                  policy.threads))
    write_json(gguf / "export.json", {
        "task": task, "parameters": parameters, "prompts": len(prompts),
        "merged_answers": ref.answers[:5], "types": files})
    return files


def _round_trips(path, merged, ref, gguf_type: str, check: dict, threads: int) -> dict:
    from ..models import gguf_export, gguf_roundtrip

    imported = gguf_roundtrip.importer_check(path, merged, ref, gguf_type)
    gc.collect()
    if imported["checked"] and not imported["ok"]:
        raise RuntimeError(
            f"GGUF round trip: {path.name} read back differs from the merged model by "
            f"{imported['max_weight_rel_error']:.3g} (relative) in {imported['worst_tensor']}, "
            f"beyond what {gguf_type} rounding explains ({imported['bound']:g}); the "
            f"conversion is wrong, nothing is exported")
    if not check["llama_cpp"]:
        return {"importer": imported, "llama_cpp": {"checked": False,
                                                    "why": "export.check.llama_cpp: false"}}
    run = gguf_roundtrip.llama_cpp_check(path, ref, check["max_new_tokens"], threads)
    log.info("%s: importer %s; llama.cpp same answer %.3f, same tokens %.3f", path.name,
             {k: imported.get(k) for k in ("max_weight_rel_error", "same_top_token")},
             run["same_answer"], run["same_tokens"])
    if gguf_type in gguf_export.FLOAT_TYPES and run["same_answer"] < check["min_agreement"]:
        raise RuntimeError(
            f"GGUF round trip: llama.cpp running {path.name} gives the merged model's greedy "
            f"answer on {run['same_answer']:.1%} of {run['prompts']} test prompts; expected "
            f"at least {check['min_agreement']:.0%} (export.check.min_agreement) for a "
            f"{gguf_type} file. First differences: {run['examples']}")
    return {"importer": imported, "llama_cpp": run}
