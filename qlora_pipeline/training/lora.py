"""LoRA on a (quantized) causal LM with PEFT: W = W0 + (alpha/r)·BA, W0 frozen, B = 0 at start."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from ..core.errors import InputError

log = logging.getLogger(__name__)
WEIGHT_DERIVED = ("loftq", "pissa")  # lora.init values set from the base's weights (init.py)


def _linear_layers(model) -> list[tuple[str, object]]:
    """(name, module) of the model's linear layers, quantized or not, output head excluded."""
    from ..models.methods import layers_types

    kinds, head = (torch.nn.Linear, *layers_types()), model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, kinds) and module is not head]


def linear_names(model) -> list[str]:
    """Leaf names of the model's linear layers (q_proj, v_proj, ...), output head excluded."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_layers(model)})


def targeted_layers(model, target_modules, layers: list[int] | None = None) -> list[tuple[str, object]]:
    """The (name, module) pairs a LoRA config with these targets will adapt."""
    names = set(linear_names(model)) if target_modules == "all-linear" else set(target_modules)
    return [(name, module) for name, module in _linear_layers(model)
            if name.rsplit(".", 1)[-1] in names
            and (layers is None or any(f".{i}." in f".{name}." for i in layers))]


def check(model, cfg: dict) -> None:
    """Refuse targets that match nothing, rank_pattern keys that match no targeted layer, and
    ranks (r, or a rank_pattern rank) larger than a layer's dims."""
    targets = cfg["target_modules"]
    available = linear_names(model)
    if targets == "all-linear" and cfg.get("layers_to_transform") is not None:
        raise InputError("lora.layers_to_transform needs explicit lora.target_modules (PEFT "
                         f"cannot combine it with 'all-linear'); expected names among {available}")
    if targets != "all-linear" and (missing := [t for t in targets if t not in available]):
        raise InputError(f"lora.target_modules: {missing} match no linear layer of the "
                         f"model; expected names among {available} or 'all-linear'")
    layers = targeted_layers(model, targets, cfg.get("layers_to_transform"))
    if not layers:
        raise InputError(f"lora.layers_to_transform {cfg.get('layers_to_transform')}: no "
                         f"targeted layer is in those layers")
    patterns = cfg.get("rank_pattern") or {}
    keys = _check_rank_pattern(patterns, [name for name, _ in layers])
    by_r = [m for name, m in layers if keys[name] is None]
    smallest = min((min(m.in_features, m.out_features) for m in by_r), default=None)
    # AdaLoRA's layers start at init_r, its largest rank
    key, rank = (("lora.adalora.init_r", cfg["adalora"]["init_r"]) if cfg.get("type") == "adalora"
                 else ("lora.r", cfg["r"]))
    if smallest is not None and rank > smallest:
        raise InputError(f"{key}: found {rank}, expected at most {smallest} (the smallest "
                         f"dimension of a targeted layer)")
    for key, rank in patterns.items():
        applied = [(name, m) for name, m in layers if keys[name] == key]
        if not applied:
            continue
        name, m = min(applied, key=lambda nm: min(nm[1].in_features, nm[1].out_features))
        if rank > min(m.in_features, m.out_features):
            raise InputError(f"lora.rank_pattern: key '{key}': found rank {rank}, expected at "
                             f"most {min(m.in_features, m.out_features)} (the smallest "
                             f"dimension of {name}, a layer it matches)")


def _pattern_key(patterns, module_name: str) -> str | None:
    r"""The rank_pattern key PEFT applies to this module (None: it uses r). PEFT's own helper
    (LoraModel._create_and_replace: the first key in order with
    re.match(rf"(.*\.)?({key})$", module_name)), so this check agrees with what PEFT does."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module_name)  # module_name itself when none matches
    return key if key in patterns else None


def _check_rank_pattern(patterns: dict, names: list[str]) -> dict[str, str | None]:
    """{targeted layer: the rank_pattern key that sets its rank, or None}. Refuses a key that
    is not a valid regex, one that matches no targeted layer, and a layer matched by two keys
    with different ranks (the task config's keys are sorted, so PEFT's first match would not
    follow the file's order)."""
    for key in patterns:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as err:
            raise InputError(f"lora.rank_pattern: key '{key}': found an invalid regular "
                             f"expression ({err}); expected a module name such as "
                             f"{names[0]} or a suffix such as {names[0].rsplit('.', 1)[-1]}"
                             ) from None
        if not any(_pattern_key({key: 0}, name) is not None for name in names):
            raise InputError(f"lora.rank_pattern: key '{key}': found no targeted layer it "
                             f"matches; expected a targeted module name such as {names[0]} or "
                             f"a suffix of one such as {names[0].rsplit('.', 1)[-1]} (a layer "
                             f"outside lora.target_modules / layers_to_transform gets no adapter)")
    for name in names:
        ranks = {key: rank for key, rank in patterns.items()
                 if _pattern_key({key: 0}, name) is not None}
        if len(set(ranks.values())) > 1:
            raise InputError(f"lora.rank_pattern: keys {ranks} all match {name}, with "
                             f"different ranks; expected one rank per layer (PEFT takes the "
                             f"first matching key, and task configs are read with sorted keys, "
                             f"not in the file's order)")
    return {name: _pattern_key(patterns, name) for name in names}


def expected_trainable(model, cfg: dict) -> int:
    """LoRA's parameter count: rank·(in + out) per adapted layer, rank from lora.rank_pattern
    where a key matches it, else r (+ out for DoRA's magnitude). AdaLoRA: init_r·(in + out)
    + init_r (E) per layer, pruned triplets included (they are masked, not removed)."""
    patterns, dora = cfg.get("rank_pattern") or {}, cfg.get("use_dora")
    layers = targeted_layers(model, cfg["target_modules"], cfg.get("layers_to_transform"))
    if cfg.get("type") == "adalora":
        init_r = cfg["adalora"]["init_r"]
        return sum(init_r * (m.in_features + m.out_features + 1) for _, m in layers)
    return sum(patterns.get(_pattern_key(patterns, name), cfg["r"])  # r where no key matches
               * (m.in_features + m.out_features) + (m.out_features if dora else 0)
               for name, m in layers)


def prepare_qlora(quantized_dir, cfg: dict, policy, gradient_checkpointing: bool,
                  total_steps: int):
    """(model, expected trainable count): the saved quantized base (never quantized again
    here) with new LoRA layers (A random, B zero), or the initial adapter a training's own
    base carries (`initial/`, training/init.py); `total_steps`: AdaLoRA's schedule."""
    from ..models.quantization import load_quantized

    initial = Path(quantized_dir) / "initial"
    model = load_quantized(quantized_dir, policy)
    expected = expected_trainable(model, cfg) if cfg["target_modules"] else 0
    return inject(model, cfg, gradient_checkpointing, total_steps=total_steps,
                  initial=initial if cfg["init"] in WEIGHT_DERIVED and initial.is_dir()
                  else None), expected


def prepare_recovery(base_dir, adapter_dir, policy, gradient_checkpointing: bool,
                     total_steps: int | None = None):
    """(model, expected trainable count): the full-precision base with a trained adapter,
    trainable again, to continue it on the weights it will be merged into. `total_steps` is
    unused: recovery continues a plain LoRA adapter (AdaLoRA's is refused by the config)."""
    del total_steps
    from peft import PeftModel

    from ..models.quantization import load_full_precision

    saved = saved_lora(adapter_dir, "recovery")
    base = load_full_precision(base_dir, policy)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()  # frozen embeddings: let gradients reach LoRA
    expected = expected_trainable(base, saved)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    keep_adapters_fp32(model)
    return model, expected


def saved_lora(adapter_dir, key: str) -> dict:
    """A saved adapter's settings as a `lora` block (recovery continues it: its size, its
    trainable count). Its targets are leaf names (q_proj, ...), as lora.check required them
    of a QLoRA training; a module path saved by another tool is cut to its leaf."""
    from peft import LoraConfig

    check_adapter(adapter_dir, key)
    saved = LoraConfig.from_pretrained(adapter_dir)
    targets = saved.target_modules
    return {"r": saved.r, "use_dora": saved.use_dora, "rank_pattern": saved.rank_pattern or {},
            "layers_to_transform": saved.layers_to_transform,
            "target_modules": targets if isinstance(targets, str)
            else sorted({t.rsplit(".", 1)[-1] for t in targets})}


def check_adapter(adapter_dir, key: str) -> None:
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise InputError(f"{key}: no QLoRA adapter at {adapter_dir} (expected "
                         f"adapter_config.json and adapter_model.safetensors); run the "
                         f"train_qlora stage for this task first")


def verify_frozen(model, expected_trainable: int) -> dict:
    """Every base weight frozen; exactly the LoRA parameters train (count checked when the
    LoRA arithmetic gives one: `expected_trainable` > 0)."""
    not_lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if not_lora:
        raise RuntimeError(f"base parameters left trainable: {not_lora[:5]}")
    params = trainable_summary(model)
    if expected_trainable and params["trainable_params"] != expected_trainable:
        raise RuntimeError(f"trainable parameters {params['trainable_params']} != LoRA "
                           f"arithmetic {expected_trainable}")
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"adapter weights must be float32, found {dtypes}")
    return params


def inject(model, cfg: dict, gradient_checkpointing: bool, total_steps: int | None = None,
           initial=None):
    """Prepare the quantized model for k-bit training, then add LoRA (or AdaLoRA, whose
    schedule spans `total_steps`): in that order. `initial`: an initial adapter's folder to
    load (trainable) instead of new layers. A weight-derived init's layers start as PEFT's
    default; training/init.py sets them."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    adalora = cfg.get("type") == "adalora"
    check(model, cfg)
    targets = cfg["target_modules"]
    if targets == "all-linear" and getattr(model, "hqq_quantized", False):
        # PEFT's 'all-linear' looks for nn.Linear and bitsandbytes' layers, not HQQLinear.
        targets = linear_names(model)
    config = _adalora_config(cfg, total_steps, targets) if adalora \
        else lora_config(cfg, targets, True if cfg["init"] in WEIGHT_DERIVED else cfg["init"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = get_peft_model(model, config) if initial is None else \
        PeftModel.from_pretrained(model, initial, is_trainable=True, config=config)
    keep_adapters_fp32(model)
    return model


def _shared(cfg: dict, targets, init) -> dict:
    """What PEFT's LoraConfig and AdaLoraConfig take alike from a lora block."""
    return dict(task_type="CAUSAL_LM", lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                target_modules=targets, init_lora_weights=init, bias="none",
                layers_to_transform=cfg.get("layers_to_transform"))


def lora_config(cfg: dict, targets, init):
    """PEFT's LoraConfig of a lora block; `init`: PEFT's init_lora_weights."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg["r"], use_rslora=cfg["use_rslora"], use_dora=cfg["use_dora"],
        # int(): the schema's "integer" also admits 2.0, which PEFT cannot size a layer with.
        rank_pattern={key: int(rank) for key, rank in (cfg.get("rank_pattern") or {}).items()},
        **_shared(cfg, targets, init))


def _adalora_config(cfg: dict, total_steps: int | None, targets):
    """PEFT's AdaLoraConfig: lora.r is the target rank, the schedule spans the training."""
    from peft import AdaLoraConfig

    ada = cfg["adalora"]
    if total_steps is None or ada["tinit"] + ada["tfinal"] >= total_steps:
        raise InputError(f"lora.adalora: tinit {ada['tinit']} + tfinal {ada['tfinal']} leave "
                         f"no pruning steps in a training of {total_steps} steps; expected a "
                         f"sum below the step count (train.max_steps or epochs)")
    return AdaLoraConfig(target_r=cfg["r"], total_step=total_steps, **ada,
                         **_shared(cfg, targets, cfg["init"]))


def keep_adapters_fp32(model) -> None:
    """Trainable (adapter) weights in float32 whatever the compute dtype: the QLoRA recipe."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def trainable_summary(model) -> dict:
    from ..models.methods import layers

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # HQQ's packed codes (W_q) are a parameter of another size, and its bias a plain tensor:
    # count the weight they encode, and the bias.
    hqq = [m for _, m in layers(model) if hasattr(m, "W_q")]
    packed = {id(m.W_q): math.prod(m.meta["shape"]) for m in hqq}
    total = sum(packed.get(id(p)) or _stored_numel(p) for p in model.parameters()) + \
        sum(m.bias.numel() for m in hqq if m.bias is not None
            and not isinstance(m.bias, torch.nn.Parameter))
    return {"trainable_params": trainable, "total_params": total,
            "trainable_pct": round(100 * trainable / total, 4)}


def _stored_numel(param) -> int:
    # A 4-bit weight is stored packed two per byte; count the parameters it represents.
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()
