"""Whether an adapter folder is what vLLM's LoRA loader reads, checked without vLLM.

vLLM (`--enable-lora`, `LoRARequest(name, id, path)`) reads adapter_config.json through its
PEFTHelper (vllm/lora/peft_helper.py) and the weights from adapter_model.safetensors, keyed as
PEFT saves them (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`). It requires
`r`, `lora_alpha` and `target_modules`; refuses DoRA and `modules_to_save`; serves bias
`none` only (unless started with `--enable-lora-bias`); and scales every module by
lora_alpha / r (lora_alpha / √r with rsLoRA): a per-module rank or alpha (`rank_pattern`,
`alpha_pattern`, as the compressed and some combined adapters have) would be served with the
wrong scale, silently. Its `--max-lora-rank` (default 16) must be at least the adapter's
largest rank. Hand-written because vLLM is not installed here (it needs a GPU build); the rules
above are those of vLLM's PEFTHelper, cited in docs/serving.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.memory import safetensors_header

REQUIRED = ("r", "lora_alpha", "target_modules")
# Settings vLLM refuses when they are set, and its reason.
REFUSED = {"use_dora": "vLLM does not support DoRA",
           "modules_to_save": "vLLM only supports it being None"}
KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def vllm_problems(adapter_dir: str | Path) -> list[str]:
    """What would stop vLLM from serving the adapter as PEFT computes it (empty: ready)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_path.exists() or not weights.exists():
        return [f"{adapter_dir}: no adapter_config.json and adapter_model.safetensors"]
    config = json.loads(config_path.read_text(encoding="utf-8"))
    problems = [f"adapter_config.json has no {key!r}" for key in REQUIRED if key not in config]
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA only")
    problems += [f"{key}: {why}" for key, why in REFUSED.items() if config.get(key)]
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias: vLLM serves bias 'none' only (without --enable-lora-bias)")
    problems += [f"{key}: vLLM scales every module by lora_alpha/r; the {len(config[key])} "
                 f"modules it names would get the wrong scale"
                 for key in ("rank_pattern", "alpha_pattern") if config.get(key)]
    if (adapter_dir / "initial").is_dir():  # LoftQ/PiSSA: it holds part of its own base
        problems.append("initial/: trained from a LoftQ or PiSSA initialisation on a base of "
                        "its own; on the original base serve converted/ (plain LoRA, rank 2r)")
    problems += _tensor_problems(weights)
    return problems


def _tensor_problems(weights: Path) -> list[str]:
    keys = sorted(safetensors_header(weights))  # as safetensors' safe_open(...).keys()
    matches = [KEY.fullmatch(k) for k in keys]
    odd = [k for k, match in zip(keys, matches) if not match]
    modules = {}
    for match in filter(None, matches):
        modules.setdefault(match[1], set()).add(match[2])
    unpaired = sorted(m for m, parts in modules.items() if parts != {"A", "B"})
    return ([f"tensors vLLM does not read: {odd[:3]}"] if odd else []) + \
        ([f"modules without both lora_A and lora_B: {unpaired[:3]}"] if unpaired else [])


def max_rank(adapter_dir: str | Path) -> int:
    """The largest rank among the adapter's modules (vLLM's --max-lora-rank must reach it)."""
    header = safetensors_header(Path(adapter_dir) / "adapter_model.safetensors")
    return max((info["shape"][0] for key, info in header.items()
                if key.endswith("lora_A.weight")), default=0)
