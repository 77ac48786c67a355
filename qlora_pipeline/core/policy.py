"""The runtime policy of one job: device, dtypes, optimizer fallback, gradient checkpointing,
evaluation batch size and threads, decided once when the job starts and passed down (the way
torchtune's recipes and nanoGPT settle device and dtype once). Nothing below a stage asks the
hardware again, so a job cannot mix two answers, and provenance records the one it used.

One story: CUDA when present (bf16 where the GPU supports it, paged optimizers, gradient
checkpointing), the CPU otherwise (float32, the bitsandbytes CPU backend, plain AdamW).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
CPU_EVAL_BATCH_SIZE = 8  # lm-eval's "auto" probes GPU memory; on a CPU a fixed size
# On a CPU every forward costs the same fixed work whatever the batch (a 4-bit model
# dequantizes each weight per forward; Python's per-layer overhead), so "auto" batches
# generation and shared-context scoring up to this many tokens a batch (rows × longest row):
# the quantized `arithmetic` evaluation took 30.0 s at 8 rows and 22.7 s at 40 here.
CPU_EVAL_TOKENS = 2048


def torch_dtype(name: str):
    """torch.float32 for 'float32' (also 'torch.float32', as transformers' configs store it)."""
    import torch

    name = name.replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class Policy:
    device: str  # "cuda", "cuda:<local rank>" or "cpu": where models are placed (device_map)
    device_name: str  # what provenance records: "cuda:<GPU name>" or "cpu:<N> cores"
    bf16: bool  # a CUDA device with bf16: mixed-precision training and bf16 loads
    threads: int  # torch's intra-op threads (the rule's `threads:`)

    @classmethod
    def detect(cls, threads: int | None = None) -> Policy:
        """The policy of this process's hardware; `threads` defaults to torch's current."""
        try:
            import torch
        except ImportError:  # the data stages' environment has no torch
            return cls.cpu(threads or 1)
        threads = threads or torch.get_num_threads()
        if torch.cuda.is_available():
            # A rank of a distributed training (torchrun sets LOCAL_RANK) has its own GPU.
            local = os.environ.get("LOCAL_RANK")
            device = f"cuda:{local}" if local is not None else "cuda"
            return cls(device, f"cuda:{torch.cuda.get_device_name(device)}",
                       torch.cuda.is_bf16_supported(), threads)
        return cls.cpu(threads)

    @classmethod
    def cpu(cls, threads: int) -> Policy:
        """The policy of a job that declares no GPU (data, spec and report jobs, the import):
        it runs on the CPU whatever the machine has, so nothing is asked of the hardware and
        torch is not imported (~1.3 s on a 2-core CPU, for a job that may not use it)."""
        return cls("cpu", f"cpu:{os.cpu_count()} cores", False, threads)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def compute_dtype(self, name: str):
        """A configured compute dtype; 'auto': bf16 (fp16 without it) on CUDA, float32 on the
        CPU (the bitsandbytes CPU backend's exact path)."""
        if name == "auto":
            name = "float32" if not self.cuda else ("bfloat16" if self.bf16 else "float16")
        return torch_dtype(name)

    @property
    def full_precision_dtype(self):
        """The dtype of every "full precision" model (base, recovered, merged)."""
        return torch_dtype("bfloat16" if self.bf16 else "float32")

    def optimizer(self, requested: str) -> str:
        """Paged optimizers need CUDA; on the CPU plain AdamW does the same job."""
        return "adamw_torch" if not self.cuda and requested in PAGED_OPTIMIZERS else requested

    def gradient_checkpointing(self, setting) -> bool:
        """'auto': on a GPU (memory is what is short), off on a CPU (compute is)."""
        return self.cuda if setting == "auto" else bool(setting)

    def eval_batch_size(self, setting):
        return CPU_EVAL_BATCH_SIZE if setting == "auto" and not self.cuda else setting

    def eval_token_budget(self, setting) -> int | None:
        """Tokens per evaluation batch where batches are sized by length (CPU, "auto")."""
        return CPU_EVAL_TOKENS if setting == "auto" and not self.cuda else None

    def peak_memory_mb(self) -> float:
        """What this job used at most: CUDA's max allocated on a GPU, else the process's max
        RSS (Linux: KiB). A warm-start copy's RSS starts at its server's."""
        import resource
        import sys

        torch = sys.modules.get("torch")
        if self.cuda and torch is not None and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def as_dict(self) -> dict:
        return {"device": self.device_name, "bf16": self.bf16, "threads": self.threads}
