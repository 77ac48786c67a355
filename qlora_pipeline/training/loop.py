"""The training loop: transformers' Trainer with our data collator, metrics and guards
(a non-finite loss stops it; so does an adapter that gets no gradient: gradient_guard.py).

Trainer rather than TRL's SFTTrainer: our data arrive already tokenized and masked by the
tokenize stage, which is SFTTrainer's main job; Trainer gives the rest (schedulers, paged
optimizers, gradient checkpointing, early stopping, checkpoint resume) with fewer moving parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core import disk
from ..core.errors import InputError, ResumeLater
from ..core.files import read_json, read_jsonl, write_json
from ..core.policy import Policy
from ..models import label_positions
from . import adalora, checkpoints, distributed, packing, shared_prefix
from .deadline import Deadline
from .gradient_guard import GradientGuard

log = logging.getLogger(__name__)


INTEGRATIONS = ("mlflow", "wandb")  # trackers whose callbacks transformers adds (report_to)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops at once."""


class GuardedTrainer(Trainer):
    prefix_layouts = ()  # rows' common prefix computed once in these (shared_prefix.py), proven

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.prefix_layouts:
            inputs = shared_prefix.split(model, inputs, self.prefix_layouts)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"training loss became {loss.item()} at step "
                                f"{self.state.global_step + 1}; lower train.learning_rate or "
                                f"check the data")
        return loss

    def evaluate(self, *args, **kwargs):
        with adalora.task_loss_only(self.model):  # validation loss without AdaLoRA's penalty
            return super().evaluate(*args, **kwargs)

    # AdaLoRA's checkpoints keep every triplet and the rank allocator's state (adalora.py).
    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-"
                      f"{self.state.global_step}")
        # torch.save's full disk told as ENOSPC; each checkpoint holds the trainable weights
        trainable = sum(p.numel() * p.element_size() for p in model.parameters()
                        if p.requires_grad)
        with disk.torch_writes(folder, trainable), \
                adalora.whole_checkpoint(self.model, folder, saving=True):
            super()._save_checkpoint(model, trial)
        write_json(folder / f"loss_state_{self.args.process_index}.json", {
            "total": self._total_loss_scalar, "pending": self._tr_loss.item(),
            "last_logged": self._globalstep_last_logged})
        # The manifest last, once every rank has written its files (rng_state_<rank>.pth).
        self.accelerator.wait_for_everyone()
        if distributed.is_main():
            checkpoints.write_manifest(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with adalora.whole_checkpoint(self.model, resume_from_checkpoint, saving=False):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint, f"loss_state_{self.args.process_index}.json")
        self.add_callback(CarriedLoss(self, read_json(path) if path.exists() else None))

    def _load_best_model(self):
        with adalora.whole_checkpoint(self.model, self.state.best_model_checkpoint,
                                      saving=False):
            super()._load_best_model()


class CarriedLoss(TrainerCallback):
    """Trainer's running loss restored from the checkpoint a run resumes from (saved beside it
    by GuardedTrainer): Trainer starts it afresh, so a resumed run's train_loss would average
    only the steps after the resume, and the first loss it logs only those since the resume.
    Restored as it was (the float32 sum pending since the last log), both are an uninterrupted
    run's, bit for bit. Set at train begin: Trainer resets them just before."""

    def __init__(self, trainer, saved: dict | None):
        self.trainer, self.saved = trainer, saved

    def on_train_begin(self, args, state, control, **kwargs):
        if self.saved:  # a checkpoint from before this file was saved: Trainer's own average
            trainer = self.trainer
            trainer._total_loss_scalar = self.saved["total"]
            trainer._tr_loss = torch.tensor(self.saved["pending"], device=args.device)
            trainer._globalstep_last_logged = self.saved["last_logged"]
            trainer._initial_global_step = 0  # train_loss: over every step, not this run's


class MetricsLog(TrainerCallback):
    """Every log event as one JSON line: step, loss, learning rate, grad norm, eval loss."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, "epoch": state.epoch, **(logs or {})}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def total_steps(cfg: dict, train_examples: int) -> int:
    if cfg.get("max_steps"):
        return cfg["max_steps"]
    per_epoch = math.ceil(train_examples / (cfg["batch_size"] * cfg["gradient_accumulation"]))
    return math.ceil(per_epoch * cfg["epochs"])  # a fractional epoch count rounds up


def arguments(cfg: dict, out_dir: Path, train_examples: int, seed: int, policy: Policy,
              packed: bool = False, fresh: bool = True, trackers: dict | None = None
              ) -> TrainingArguments:
    steps = total_steps(cfg, train_examples)
    eval_steps = min(cfg["eval_steps"], steps)
    save_steps = cfg.get("checkpoint_steps") or eval_steps
    spread = cfg.get("distributed") or {}  # over several processes (distributed.py)
    if save_steps % eval_steps:
        raise InputError(f"train.checkpoint_steps: found {save_steps}, expected a multiple of "
                         f"train.eval_steps ({eval_steps}) so the best checkpoint can be kept")
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation"],
        learning_rate=cfg["learning_rate"],
        warmup_steps=round(cfg["warmup_ratio"] * steps),
        lr_scheduler_type=cfg["lr_scheduler"],
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"],
        optim=distributed.optimizer(policy.optimizer(cfg["optimizer"]), spread),
        gradient_checkpointing=False,  # enabled on the model by prepare_model_for_kbit_training
        bf16=policy.bf16,
        use_cpu=not policy.cuda,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length" if cfg.get("group_by_length") else "random",
        eval_strategy="steps",
        eval_steps=eval_steps,
        # The loss before training, measured inside train() once the model is wrapped for
        # DDP: an evaluate() before train() marks it prepared, and accelerate then never wraps
        # it, so each rank would step on its own gradients.
        eval_on_start=fresh,
        save_strategy="steps",
        save_steps=save_steps,  # checkpoints serve resuming and keeping the best
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
        # Real tokens: a padded batch's attention mask says which; a packed row (no mask) is
        # padded only at its end, so all of its tokens count.
        include_num_input_tokens_seen="all" if packed else "non_padding",
        # transformers' own callbacks; TensorBoard's is ours (tensorboard_writer)
        report_to=[t for t in INTEGRATIONS if t in (trackers or {})] or "none",
        run_name=(trackers or {}).get("run"),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **distributed.trainer_arguments(spread, policy.cuda),
    )


def train(model, tokenizer, data, cfg: dict, checkpoint_dir: Path, metrics_path: Path,
          seed: int, policy: Policy, observers: tuple = (), trackers: dict | None = None,
          save_to: Path | None = None) -> dict:
    """Train `model` (its trainable parameters) on data['train']; return the run summary.

    Checkpoints go to `checkpoint_dir` (outside the rule's outputs, so an interrupted job
    resumes from them); the best checkpoint by validation loss is restored at the end.
    `observers`: extra callbacks that only watch (the adapter's spectrum, the step-time
    benchmark); `trackers`: where the curves go, by tracker, under the run name "run"
    (layout.trackers; TensorBoard's folder is emptied unless the job resumes);
    `save_to`: where the trained adapter is saved (distributed.save_adapter).
    """
    if len(data["train"]) == 0 or len(data["validation"]) == 0:
        raise InputError("training needs non-empty train and validation splits")
    resume, resumed = last_complete_checkpoint(checkpoint_dir,
                                               total_steps(cfg, len(data["train"])))
    trackers = trackers or {}
    args = arguments(cfg, checkpoint_dir, len(data["train"]), seed, policy,
                     packed=packing.is_packed(data["train"]), fresh=not resume,
                     trackers=trackers)
    if args.optim != cfg["optimizer"]:
        log.info("optimizer: %s unavailable here (CUDA; FSDP); using %s instead",
                 cfg["optimizer"], args.optim)
    isolation = packed_isolation(model, data["train"])
    # Rank 0 keeps the record; every rank checks its own gradients. AdaLoRA's allocation
    # first: it adds the kept rank to the record.
    allocation = (adalora.RankAllocation(),) if adalora.allocator(model) else ()
    deadline = Deadline()
    callbacks = [*allocation, *((MetricsLog(metrics_path),) if distributed.is_main() else ()),
                 GradientGuard(), deadline, *observers]
    if cfg.get("early_stopping_patience"):
        callbacks.append(EarlyStoppingCallback(cfg["early_stopping_patience"]))
    validation = data["validation"]
    if cfg.get("max_eval_examples"):
        validation = validation.select(range(min(cfg["max_eval_examples"], len(validation))))
    head = proven_on_first_rows("output head only at labelled positions", label_positions.check,
                                model, validation, packing.Collator(tokenizer), args)
    collator = packing.Collator(tokenizer, label_positions=head["used"])
    if distributed.active():  # the cached prefix is a second forward inside DDP's step
        prefix = {"used": False, "reason": f"distributed over {distributed.world_size()} ranks"}
    else:
        prefix = proven_on_first_rows("rows' common prefix computed once", shared_prefix.check,
                                      model, data["train"], collator, args)
    trainer = GuardedTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=validation,
        data_collator=collator, callbacks=callbacks,
    )
    trainer.prefix_layouts = tuple(prefix.get("layouts", ()))
    if "tensorboard" in trackers and distributed.is_main():
        trainer.add_callback(tensorboard_writer(Path(trackers["tensorboard"]), fresh=not resume))
    # seen before the interruption: not part of this run's throughput
    tokens_before = (resumed.num_input_tokens_seen or 0) if resume else 0
    if resume:
        log.info("resuming from %s", resume)
    if distributed.is_main():  # a fresh start forgets a run killed before its first checkpoint
        forget_metrics_after(metrics_path, resumed.global_step if resume else -1)
    started = time.time()
    # patch.dict: the trackers' settings for this training only (a test process trains many)
    with mock.patch.dict(os.environ, tracker_environment(trackers)):
        result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started
    if deadline.stopped is not None:
        raise ResumeLater(f"training stopped at step {deadline.stopped} of {args.max_steps} "
                          f"before the job's time limit, checkpoint saved in {checkpoint_dir}; "
                          f"the job's retry or a rerun resumes from it")
    # eval_on_start's loss, the adapter's starting point: in the log history, which a resumed
    # run reloads from its checkpoint (trainer_state.json)
    initial = next((record["eval_loss"] for record in trainer.state.log_history
                    if record["step"] == 0 and "eval_loss" in record), float("nan"))
    log.info("validation loss before training (adapter = 0): %.4f", initial)
    if save_to is not None:
        distributed.save_adapter(trainer, model, Path(save_to))
    ranks = adalora.rank_pattern(model) if allocation else None
    if ranks and save_to is not None and distributed.is_main():
        write_json(Path(save_to) / "rank_pattern.json", ranks)
    tokens = trainer.state.num_input_tokens_seen
    return {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss_initial": initial,
        "eval_loss_best": trainer.state.best_metric,  # the restored checkpoint's
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_seconds": round(seconds, 2),
        "tokens_seen": int(tokens),
        "tokens_per_second": round((tokens - tokens_before) / seconds, 1) if seconds else None,
        "peak_memory_mb": round(policy.peak_memory_mb(), 1),
        "peak_memory_kind": "cuda max allocated" if policy.cuda else "process max RSS",
        "optimizer": args.optim.value if hasattr(args.optim, "value") else str(args.optim),
        "resumed_from": resume,
        "processes": distributed.world_size(),
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * distributed.world_size(),
        "label_positions": head,
        "shared_prefix": prefix,
        **({"packing_check": isolation} if isolation else {}),
        **({"adalora": {"budget": ranks["budget"], "rank": sum(ranks["ranks"].values())}}
           if ranks else {}),
    }


def tracker_environment(trackers: dict) -> dict:
    """What transformers' MLflow and W&B callbacks read from the environment, where the user
    set nothing: MLflow's plain-text file store at trackers["mlflow"] (a backend MLflow keeps
    in maintenance mode and asks to be allowed: many jobs write to it at once, where SQLite
    would race on creating its tables); W&B writing under trackers["wandb"], offline unless
    an API key is set (a job is not assumed to reach the network)."""
    settings = {}
    if "mlflow" in trackers and "MLFLOW_TRACKING_URI" not in os.environ:
        settings = {"MLFLOW_TRACKING_URI": Path(trackers["mlflow"]).resolve().as_uri(),
                    "MLFLOW_ALLOW_FILE_STORE": "true"}
    if "wandb" in trackers:
        settings |= {"WANDB_DIR": str(Path(trackers["wandb"]).resolve()),
                     "WANDB_PROJECT": "qlora-pipeline",
                     **({} if "WANDB_API_KEY" in os.environ else {"WANDB_MODE": "offline"})}
    return {name: value for name, value in settings.items() if name not in os.environ}


def tensorboard_writer(folder: Path, fresh: bool):
    """transformers' TensorBoard callback writing to `folder` (TrainingArguments has no
    logging_dir any more; the callback takes a writer). A fresh training empties the folder,
    so TensorBoard shows this adapter's curves, not an earlier job's beside them."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))


def proven_on_first_rows(what: str, check, model, rows, collator, args) -> dict:
    """Whether training batches may take a shortcut, proven by `check` on a batch of the first
    rows: the output head only where a loss is taken on the first validation batch
    (label_positions.check), the rows' common prefix computed once on the first training rows
    (shared_prefix.check)."""
    if args.n_gpu > 1:  # nn.DataParallel would split the batch from its one index or prefix
        return {"used": False, "reason": f"{args.n_gpu} GPUs in one process"}
    # a training batch's size: an evaluation batch's too (arguments)
    first = range(min(args.per_device_train_batch_size, len(rows)))
    result = check(model, collator([dict(rows[i]) for i in first]))
    log.info("%s: %s", what, result)
    return result


def packed_isolation(model, train) -> dict | None:
    """For packed data: no KV cache, and proof on the row holding the most examples (among
    the first 16) that none attends to another (packing.check_isolation)."""
    if not packing.is_packed(train):
        return None
    # Training never reads a KV cache, and with one transformers ignores packed positions.
    model.config.use_cache = False
    best = max(range(min(len(train), 16)), key=lambda i: train[i]["position_ids"].count(0))
    result = packing.check_isolation(model, train[best])
    log.info("packing: examples isolated in packed rows: %s", result)
    return result


def forget_metrics_after(metrics_path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (all of them, step -1, on a
    fresh start): they will be redone."""
    if metrics_path.exists():
        kept = [record for record in read_jsonl(metrics_path) if record["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def last_complete_checkpoint(checkpoint_dir: Path, max_steps: int | None = None
                             ) -> tuple[str | None, TrainerState | None]:
    """The newest checkpoint whose files match its manifest (checkpoints.py), with its state;
    (None, None) if there is none. A checkpoint that fails is deleted, with the file and what
    is wrong logged; so is one whose recorded best checkpoint failed: resumed without it, the
    training could not end on the checkpoint an uninterrupted one restores (load_best_model
    at the end), so an older checkpoint, or a fresh start, keeps the adapter the same. So is
    one at the training's last step (`max_steps`; a job that failed after training, e.g. on a
    full disk): Trainer checks its end only after a step, so resumed there it would train one
    step more (fault campaign, trial 143); the steps since the one before are trained again."""
    found = sorted(checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"),  # none if no folder
                   key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    good = []
    for candidate in found:
        problem = checkpoints.verify(candidate)
        if problem:
            discard(candidate, problem)
        else:
            good.append(candidate)
    kept = {candidate.name for candidate in good}
    for candidate in good:
        state = TrainerState.load_from_json(f"{candidate}/trainer_state.json")
        if max_steps is not None and state.global_step >= max_steps:
            discard(candidate, f"it is the last step ({max_steps}); resumed there, Trainer would "
                               f"train a step more")
            continue
        best = state.best_model_checkpoint and Path(state.best_model_checkpoint).name
        if best and best not in kept:
            discard(candidate, f"its best checkpoint {best}, restored at the end, is gone")
            continue
        return str(candidate), state
    return None, None


def discard(checkpoint: Path, problem: str) -> None:
    log.warning("discarding checkpoint %s: %s", checkpoint, problem)
    shutil.rmtree(checkpoint, ignore_errors=True)


def resume_folder(root: Path, key: str) -> Path:
    """root/key, made: the folder of a training's checkpoints, keyed by config hash. Those of
    another config are never resumed: rank 0 discards them. The job holds root's lock
    (checkpoints.locked), so no other job is writing them."""
    if distributed.is_main():
        for other in root.glob("*"):  # none if no folder; hidden names included, as iterdir
            if other.name not in (key, checkpoints.LOCK):
                log.info("discarding checkpoints %s: made under another configuration", other)
                shutil.rmtree(other, ignore_errors=True)
    (root / key).mkdir(parents=True, exist_ok=True)
    return root / key
