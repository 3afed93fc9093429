"""Fine-tune all-MiniLM-L6-v2 on a text-classification task -- ``python -m golore_lab finetune``.

The CPU stand-in for the paper's RoBERTa/GLUE (Table 2) and LLaMA2-7B/MSGD (Figure 4) runs: the model is
:mod:`golore_lab.lm.minilm`, the data :mod:`golore_lab.lm.tasks`. This module only defines the
*task* -- model, resumable batches, loss, evaluation -- and hands it to the shared training loop
(:mod:`golore_lab.lm.train`), which owns the optimizer (Full / GaLore / GoLore@x% / large-batch GaLore with
AdamW or momentum SGD), schedule, clipping, checkpoints and ``--resume``, metrics files, progress bar and
``torchrun``.

Batches: each split is tokenised once (truncated to ``max_length`` tokens, unpadded) and every batch is padded
to its own longest sequence. The training stream visits the examples epoch after epoch in seeded orders (the
loop's :func:`~golore_lab.lm.train.stream_indices`), so a batch is a pure function of (seed, position): resuming
needs only the position, and DDP ranks split each global batch exactly.

Presets (``--preset``, :data:`PRESETS`): ``cpu`` (the default; 40 steps of 16 examples, the size the figures
use), ``paper`` (the paper's GLUE recipe: all the data, 30 epochs, lr 3e-5, τ = 500) and ``fast`` (a CI smoke
test). Every :class:`~golore_lab.lm.train.TrainConfig` field is a flag (``--lr``, ``--steps``,
``--update-proj-gap``, ``--method golore@20`` ...); ``--epochs`` sets ``--steps`` from the training-set size.
In ``--out``: ``metrics.csv`` and ``metrics.jsonl`` (training loss every ``--log-every`` steps; validation loss,
accuracy and macro-F1 every epoch, or every ``--eval-every`` steps), ``checkpoint.pt`` (atomic; ``--stop-at`` /
``--resume``) and ``test_metrics.json`` once the run is complete.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from golore_lab.lm.fetch import FetchError
from golore_lab.lm.tasks import TASKS, accuracy, load_splits, macro_f1

#: Default maximum sequence length per task (tokens, including [CLS]/[SEP]); see ``--max-length``.
#: Movie-review sentences have at most 51 words, so 64 truncates almost nothing; BBC articles (≈ 400 words)
#: are cut to their headline and first sentences, which carry the topic.
MAX_LENGTH = {"movie-reviews": 64, "bbc-news": 128}


@dataclass
class Encoded:
    """A tokenised split: one ``LongTensor`` of token ids per example (unpadded) and the labels ``(N,)``."""

    ids: list[torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor | list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Pad the chosen examples to their longest: ``input_ids``, ``attention_mask`` ``(B, T)``, ``labels`` ``(B,)``."""
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.labels[list(index)]}


def encode(examples: list[tuple[str, int]], tokenizer, max_length: int) -> Encoded:
    """Tokenise ``(text, label)`` pairs with truncation to ``max_length`` and no padding."""
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
    return Encoded([torch.tensor(ids, dtype=torch.long) for ids in enc["input_ids"]],
                   torch.tensor([y for _, y in examples], dtype=torch.long))


def subsample(examples: list, n: int | None, seed: int) -> list:
    """``n`` examples drawn without replacement by a seeded permutation (order kept); all if ``n`` is None."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [examples[i] for i in keep]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data: Encoded, num_labels: int, pad_id: int,
                   batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of ``model`` on ``data`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    # Sorting by length keeps padding small; metrics do not depend on the order.
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    losses, preds, targets = [], [], []
    for start in range(0, len(order), batch_size):
        b = {k: v.to(device) for k, v in data.batch(order[start : start + batch_size], pad_id).items()}
        logits = model(b["input_ids"], b["attention_mask"])
        losses.append(F.cross_entropy(logits, b["labels"], reduction="sum"))
        preds.append(logits.argmax(-1))
        targets.append(b["labels"])
    model.train(was_training)
    pred, target = torch.cat(preds).cpu(), torch.cat(targets).cpu()
    return {"loss": torch.stack(losses).sum().item() / len(data), "accuracy": accuracy(pred, target),
            "macro_f1": macro_f1(pred, target, num_labels)}


@dataclass(frozen=True)
class TaskConfig:
    """What defines a fine-tuning task instance (the optimizer settings are the loop's :class:`TrainConfig`)."""

    task: str = "movie-reviews"
    max_length: int | None = None  # None: MAX_LENGTH[task]
    train_examples: int | None = None  # subsample the training split (seeded by split_seed); None: all of it
    val_examples: int | None = None  # subsample validation (the per-epoch metric)
    test_examples: int | None = None  # subsample test: only the CI smoke preset does; results use all of it
    split_seed: int = 0
    eval_batch: int = 64

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Invalid task: {self.task!r} (choose from {', '.join(TASKS)})")
        if self.max_length is not None and self.max_length < 3:
            raise ValueError(f"Invalid max_length: {self.max_length} (must be >= 3: [CLS] token [SEP])")
        for name in ("train_examples", "val_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid {name}: {value} (must be >= 1, or None for the whole split)")
        if self.eval_batch < 1:
            raise ValueError(f"Invalid eval_batch: {self.eval_batch} (must be >= 1)")


class ClassificationTask:
    """Sequence classification with all-MiniLM-L6-v2 -- implements the loop's ``Task`` protocol.

    The training stream is the (possibly subsampled) training split visited epoch after epoch in seeded orders
    (:func:`~golore_lab.lm.train.stream_indices`); the loss is the mean cross-entropy; :meth:`evaluate` reports
    ``val_loss``, ``val_accuracy`` and ``val_macro_f1``, and :meth:`test` the same on the untouched test split.
    """

    def __init__(self, config: TaskConfig = TaskConfig()):
        from golore_lab.lm.minilm import load_tokenizer

        self.config = config
        self.splits = load_splits(config.task, split_seed=config.split_seed)
        self.tokenizer = load_tokenizer()
        max_length = self.max_length = MAX_LENGTH[config.task] if config.max_length is None else config.max_length
        if max_length < 3:
            raise ValueError(f"Invalid max_length: {max_length} (must be >= 3: [CLS] token [SEP])")
        self.train = encode(subsample(self.splits.train, config.train_examples, config.split_seed), self.tokenizer,
                            max_length)
        self.val = encode(subsample(self.splits.val, config.val_examples, config.split_seed + 1), self.tokenizer,
                          max_length)
        self.test_data = encode(subsample(self.splits.test, config.test_examples, config.split_seed + 2),
                                self.tokenizer, max_length)

    @property
    def num_labels(self) -> int:
        return self.splits.num_labels

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def build_model(self, seed: int) -> torch.nn.Module:
        from golore_lab.lm.minilm import load_classifier

        model = load_classifier(self.num_labels, seed=seed)
        self._shape = model.encoder.config
        return model

    def options(self) -> dict:
        """The task configuration, with the maximum length it resolves to."""
        return {**asdict(self.config), "max_length": self.max_length}

    def activation_bytes(self, micro_batch: int) -> int:
        """:func:`~golore_lab.lm.memory.bert_activation_bytes` at ``max_length`` tokens (batches are padded to
        their longest example, at most that); call after :meth:`build_model`."""
        from golore_lab.lm.memory import bert_activation_bytes

        c = self._shape
        return bert_activation_bytes(c.hidden_size, c.num_hidden_layers, c.intermediate_size, micro_batch,
                                     self.max_length, eval_batch=self.config.eval_batch)

    def param_groups(self, model: torch.nn.Module, **subspace) -> list[dict]:
        """``[{"params": attention and MLP weights, **subspace}, {"params": the rest}]``."""
        from golore_lab.lm.minilm import subspace_parameters

        mats, rest = subspace_parameters(model)
        return [{"params": mats, **subspace}, {"params": rest}]

    def batch(self, start: int, count: int, seed: int) -> dict[str, torch.Tensor]:
        """Stream positions ``start .. start+count-1``, padded to their longest sequence."""
        from golore_lab.lm.train import stream_indices

        return self.train.batch(stream_indices(start, count, len(self.train), seed).tolist(), self.pad_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def _metrics(self, model: torch.nn.Module, data: Encoded, prefix: str) -> dict[str, float]:
        device = next(model.parameters()).device
        metrics = evaluate_model(model, data, self.num_labels, self.pad_id, self.config.eval_batch, device)
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """``val_loss``, ``val_accuracy``, ``val_macro_f1`` on the validation split."""
        return self._metrics(model, self.val, "val")

    def test(self, model: torch.nn.Module) -> dict[str, float]:
        """``test_loss``, ``test_accuracy``, ``test_macro_f1`` on the test split."""
        return self._metrics(model, self.test_data, "test")



# ---------------------------------------------------------------------------------------------- recipes

#: Learning rates by optimizer, the same for every method and both tasks: chosen on the validation accuracy of
#: full fine-tuning at the ``cpu`` size, then used unchanged for GaLore and GoLore (as the paper does).
DEFAULT_LR = {"adamw": 2e-4, "sgd": 0.03}

#: Run sizes. ``paper``: the paper's GLUE recipe (its Table 2) -- all the data, 30 epochs, batch 16, lr 3e-5 for
#: AdamW, τ = 500. ``cpu``: what the figures run on two shared CPU cores (:mod:`golore_lab.artefacts.table2_finetune`).
#: ``fast``: a smoke test for CI. Every preset: rank 4, α = 4, linear decay to 0, clip 1.
#: ``epochs`` (if given) sets ``steps`` from the size of the training set.
PRESETS = {
    "fast": dict(task=dict(train_examples=64, val_examples=32, test_examples=64, max_length=32),
                 train=dict(steps=3, batch_size=8, update_proj_gap=2, log_every=1)),
    "cpu": dict(task=dict(val_examples=128, max_length=64),
                train=dict(steps=40, batch_size=16, update_proj_gap=8, log_every=4)),
    "paper": dict(task=dict(),
                  train=dict(epochs=30, batch_size=16, update_proj_gap=500, log_every=50, lr={"adamw": 3e-5})),
}
FINETUNE_DEFAULTS = dict(rank=4, scale=4.0, schedule="linear", min_lr_ratio=0.0,
                         warmup_steps=0, weight_decay=0.0, grad_clip=1.0, momentum=0.9)


def recipe(preset: str = "cpu", task: str = "movie-reviews", optimizer: str = "adamw", *,
           epochs: float | None = None, task_overrides: dict | None = None, **train_overrides):
    """``(TaskConfig, TrainConfig)`` of a preset, with overrides; ``epochs`` sets ``steps`` from the data size.

    ``eval_every`` defaults to one epoch (per-epoch validation metrics), or the whole run if it is shorter.
    """
    from golore_lab.lm.config import MAX_STEPS, TrainConfig

    if preset not in PRESETS:
        raise ValueError(f"Invalid preset: {preset!r} (choose from {', '.join(PRESETS)})")
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (choose from {', '.join(DEFAULT_LR)})")
    spec = PRESETS[preset]
    task_cfg = TaskConfig(task=task, **{**spec["task"], **(task_overrides or {})})
    train = {**FINETUNE_DEFAULTS, "lr": DEFAULT_LR[optimizer], **spec["train"]}
    if isinstance(train["lr"], dict):
        train["lr"] = train["lr"].get(optimizer, DEFAULT_LR[optimizer])
    preset_epochs = train.pop("epochs", None)
    epochs = preset_epochs if epochs is None else epochs
    train.update({k: v for k, v in train_overrides.items() if v is not None})
    if train.get("layerwise") and train_overrides.get("grad_clip") is None:
        train["grad_clip"] = 0.0   # layer-wise steps cannot clip by the global norm
    if not isinstance(train["batch_size"], int) or train["batch_size"] < 1:
        raise ValueError(f"Invalid batch_size: {train['batch_size']} (must be >= 1)")
    n_train = len(subsample(load_splits(task, split_seed=task_cfg.split_seed).train, task_cfg.train_examples, 0))
    per_epoch = math.ceil(n_train / train["batch_size"])
    if epochs is not None and "steps" not in {k for k, v in train_overrides.items() if v is not None}:
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"Invalid epochs: {epochs} (must be a finite number > 0)")
        if epochs * per_epoch > MAX_STEPS:
            raise ValueError(f"Invalid epochs: {epochs:g} (that is {epochs * per_epoch:.3g} steps of "
                             f"{train['batch_size']} examples; at most {MAX_STEPS:.0e} steps)")
        train["steps"] = max(1, math.ceil(epochs * per_epoch))
    train.setdefault("eval_every", min(per_epoch, train["steps"]))
    return task_cfg, TrainConfig(optimizer=optimizer, **train)


def run(task_cfg: TaskConfig, train_cfg, task: "ClassificationTask | None" = None) -> dict:
    """Train with the shared loop, then score the test split; returns ``{"history", "val", "test", "wall_s"}``.

    With ``train_cfg.out_dir`` set, the loop writes ``metrics.csv``/``metrics.jsonl`` and ``checkpoint.pt`` there
    and this adds ``test_metrics.json`` (rank 0 only). ``task`` may be passed to reuse its tokenised data.
    """
    import time

    from golore_lab.fileio import atomic_write_bytes
    from golore_lab.lm.train import train

    start = time.perf_counter()
    task = task or ClassificationTask(task_cfg)
    result = train(task, train_cfg)
    summary = {"history": result.history, "val": dict(result.final), "test": {}, "step": result.step}
    if int(os.environ.get("RANK", "0")) == 0 and result.step == train_cfg.steps:
        summary["test"] = task.test(result.model)
        if train_cfg.out_dir:
            blob = {"step": result.step, **summary["val"], **summary["test"]}
            from golore_lab.lm.metrics import json_row

            clean = json.loads(json_row(blob))   # non-finite numbers as null, as in the metrics files
            atomic_write_bytes(Path(train_cfg.out_dir) / "test_metrics.json", json.dumps(clean, indent=1).encode())
    summary["wall_s"] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    from golore_lab.lm.config import finite_float, positive_int, run_program, thread_count
    from golore_lab.lm.metrics import json_row
    from golore_lab.lm.recipes import FINETUNE_RECIPES, MAX_HOURS
    from golore_lab.lm.train import TrainConfig, add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m golore_lab finetune", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("--task", default=None, metavar="{" + ",".join(TASKS) + ",glue/<name>}",
                        help="classification task: a built-in one (default: movie-reviews) or a GLUE task "
                             "(glue/cola, glue/sst2, glue/mrpc, glue/qqp, glue/stsb, glue/mnli, glue/qnli, glue/rte, "
                             "glue/wnli) with its metrics")
    parser.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                        help="any AutoModelForSequenceClassification (a hub name or a saved folder; default: "
                             "all-MiniLM-L6-v2 of the package)")
    parser.add_argument("--train-file", default=None, help="CSV / TSV / JSON Lines with GLUE's columns and label")
    parser.add_argument("--validation-file", default=None, help="the validation examples, as --train-file")
    parser.add_argument("--glue-source", default="nyu-mll/glue",
                        help="datasets name of GLUE, or a local folder in its layout (<task>/<split>-*.parquet)")
    parser.add_argument("--recipe", default=None, choices=sorted(FINETUNE_RECIPES),
                        help="the authors' fine-tuning command (golore_lab.lm.recipes); explicit options override "
                             "its values; checked against this machine before it starts")
    parser.add_argument("--max-hours", type=finite_float, default=MAX_HOURS,
                        help="a recipe estimated to take longer here is not started (exit status 3)")
    parser.add_argument("--plan-only", action="store_true",
                        help="with --recipe: print what the run needs here (inputs, memory, time) and exit")
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS), help="run size (see PRESETS)")
    parser.add_argument("--epochs", type=finite_float, default=None, help="passes over the training set (sets --steps)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens per example (default: the preset's)")
    parser.add_argument("--train-examples", type=positive_int, default=None, help="subsample the training split")
    parser.add_argument("--val-examples", type=positive_int, default=None, help="subsample the validation split")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--prepare", action="store_true",
                        help="only fetch and split both tasks into the cache (then everything runs offline)")
    names = {f.name for f in fields(TrainConfig)}
    add_train_arguments(parser, deferred=frozenset(names))  # method and optimizer too: a --recipe sets them
    args = parser.parse_args(argv)
    if args.prepare:
        from golore_lab.lm.tasks import cache_root, prepare

        try:
            for task, splits in prepare(split_seed=args.split_seed).items():
                print(f"{task}: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test, "
                      f"classes {', '.join(splits.classes)}")
        except FetchError as err:
            parser.error(str(err))
        print(f"cached under {cache_root()}")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if (args.model or args.recipe or args.train_file or args.validation_file
            or (args.task or "").startswith("glue/")):
        return hf_main(parser, args, names)
    if args.plan_only:
        parser.error("Invalid plan_only: True without --recipe")
    args.task = args.task or "movie-reviews"
    args.optimizer = args.optimizer or "adamw"
    if args.task not in TASKS:
        parser.error(f"Invalid task: {args.task!r} (choose from {', '.join(TASKS)}, or glue/<name>)")
    task_over = {k: getattr(args, k) for k in ("max_length", "train_examples", "val_examples")
                 if getattr(args, k) is not None}
    task_over["split_seed"] = args.split_seed
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    given.pop("optimizer")
    try:
        task_cfg, train_cfg = recipe(args.preset, args.task, args.optimizer, epochs=args.epochs,
                                     task_overrides=task_over, **given)
    except (ValueError, FetchError, FileNotFoundError) as err:
        parser.error(str(err))
    status, summary = run_program(parser, lambda: run(task_cfg, train_cfg))
    if status == 0 and summary["test"]:
        print(json_row({"step": summary["step"], **summary["val"], **summary["test"]}))
    return status


def hf_main(parser, args, names) -> int:
    """``finetune`` with any Hugging Face classifier (:mod:`golore_lab.lm.hftask`), a GLUE task or files."""
    from golore_lab.lm.config import TrainConfig, run_program
    from golore_lab.lm.hftask import DEFAULT_MAX_LENGTH, HFClassificationTask, HFTaskConfig, finetune_plan, load_examples
    from golore_lab.lm.metrics import json_row
    from golore_lab.lm.recipes import CANNOT_RUN, FINETUNE_RECIPES, Plan, check_input
    from golore_lab.lm.train import train

    chosen = FINETUNE_RECIPES[args.recipe] if args.recipe else {}
    preset = PRESETS[args.preset]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        task_cfg = HFTaskConfig(
            model=args.model or chosen.get("model"), task=args.task or chosen.get("task"),
            train_file=args.train_file, validation_file=args.validation_file, glue_source=args.glue_source,
            max_length=args.max_length or chosen.get("max_length") or preset["task"].get("max_length")
            or DEFAULT_MAX_LENGTH, train_examples=args.train_examples, val_examples=args.val_examples,
            split_seed=args.split_seed)
        if args.recipe:
            plan = Plan(args.recipe, None, max_hours=args.max_hours)
            where = (f"files {task_cfg.train_file!r}, {task_cfg.validation_file!r}" if task_cfg.train_file
                     else f"GLUE {task_cfg.task} from {task_cfg.glue_source!r}")
            data = check_input(plan, "data", where, lambda: load_examples(task_cfg))
        else:
            data = load_examples(task_cfg)
        optimizer = given.get("optimizer", chosen.get("train", {}).get("optimizer", "adamw"))
        if chosen:
            base = {**FINETUNE_DEFAULTS, "log_every": 10, **chosen["train"]}
            epochs = chosen.get("epochs")
        else:
            base = {**FINETUNE_DEFAULTS, "lr": DEFAULT_LR.get(optimizer, DEFAULT_LR["adamw"]), **preset["train"]}
            if isinstance(base["lr"], dict):
                base["lr"] = base["lr"].get(optimizer, DEFAULT_LR.get(optimizer, DEFAULT_LR["adamw"]))
            epochs = base.pop("epochs", None)
        epochs = args.epochs if args.epochs is not None else epochs
        train_kw = {**base, **given}
        if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"Invalid epochs: {epochs} (must be a finite number > 0)")
        if data is not None:
            per_epoch = math.ceil(len(data["train"]) / train_kw["batch_size"])
            if epochs is not None and "steps" not in given:
                train_kw["steps"] = max(1, math.ceil(epochs * per_epoch))
            train_kw.setdefault("eval_every", min(per_epoch, train_kw["steps"]))
        train_cfg = TrainConfig(**train_kw)
        if args.recipe:
            plan.steps = train_cfg.steps if data is not None or "steps" in given or epochs is None else None
            finetune_plan(plan, task_cfg, train_cfg, data)
            if rank0:
                print(plan.describe(), file=sys.stderr)
            if plan.blockers():
                return CANNOT_RUN
            if args.plan_only:
                return 0
        elif args.plan_only:
            raise ValueError("Invalid plan_only: True without --recipe")
        task = HFClassificationTask(task_cfg, data)
    except (ValueError, FetchError, FileNotFoundError) as err:
        parser.error(str(err))
    status, result = run_program(parser, lambda: train(task, train_cfg))
    if status == 0 and result.final and rank0:
        print(json_row({"step": result.step, **result.final}))
    return status


EXAMPLES = """examples:
  python -m golore_lab finetune --prepare
  python -m golore_lab finetune --task movie-reviews --method golore@20 --optimizer adamw --seed 1 --out runs/ft
  python -m golore_lab finetune --task bbc-news --method galore --optimizer sgd --out runs/bbc --stop-at 20
  python -m golore_lab finetune --task bbc-news --method galore --optimizer sgd --out runs/bbc --resume
  python -m golore_lab finetune --preset paper --task movie-reviews --method full --out runs/paper
  torchrun --standalone --nproc-per-node 2 -m golore_lab finetune --method galore --out runs/ddp
  torchrun --standalone --nproc-per-node 2 -m golore_lab finetune --method galore --fsdp --out runs/fsdp
  python -m golore_lab finetune --model roberta-base --task glue/mrpc --method golore@20 --out runs/mrpc
  python -m golore_lab finetune --model ./my-model --train-file train.csv --validation-file dev.csv --out runs/f
  python -m golore_lab finetune --recipe paper-glue --out runs/paper-glue       (the authors' RoBERTa/MRPC command)
  python -m golore_lab finetune --method golore@100 --layerwise --checkpoint-activations --out runs/lw
"""
