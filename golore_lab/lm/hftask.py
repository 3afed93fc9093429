"""Any Hugging Face sequence classifier on GLUE or on the user's files, as a task of the shared training loop.

What ``finetune --model NAME_OR_PATH`` / ``--task glue/<name>`` / ``--train-file F --validation-file F`` runs:
:class:`HFClassificationTask` implements the loop's ``Task`` protocol (:mod:`golore_lab.lm.train`) over
:mod:`golore_lab.lm.classify`, so such a run has everything the built-in tasks have -- every method and optimizer,
the schedule, clipping, checkpoints and ``--resume``, ``torchrun``, the metrics files.

* model: ``AutoModelForSequenceClassification`` from a hub name or a saved folder (default: the package's
  all-MiniLM-L6-v2 folder, which then gets ``transformers``' own classification head); its new head is seeded
  with ``--seed`` (:func:`~golore_lab.lm.classify.build_classifier`);
* data: a GLUE task through ``datasets`` (``--glue-source``: ``nyu-mll/glue``, or a local folder in that
  repository's layout) or CSV / TSV / JSON Lines files (:func:`~golore_lab.lm.classify.read_labelled_file`;
  with ``--task glue/<name>`` too, the files are read with that task's columns and metrics);
* subspace: the weight of every ``nn.Linear`` inside the encoder's numbered blocks
  (:func:`~golore_lab.lm.classify.encoder_linears`; RoBERTa / BERT: query, key, value, attention output,
  intermediate, output); embeddings, norms, pooler and head train in full;
* batches: positions of the loop's seeded stream (:func:`~golore_lab.lm.train.stream_indices`), tokenized and
  padded to their longest; dropout draws from torch's generator, forked and seeded with (seed, position) for each
  micro-batch, so a run is a function of its seed and ``--resume`` continues it bit for bit;
* evaluation: the validation split's mean loss and GLUE's metrics for the task (``val_loss``, ``val_accuracy``,
  ``val_f1``, ``val_matthews_correlation``, ``val_pearson`` ...; accuracy for files without a task). GLUE's test
  splits carry no labels: the run's last validation metrics are its result.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from golore_lab.lm import classify

DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class HFTaskConfig:
    """What defines an instance of :class:`HFClassificationTask` (the optimizer settings are the loop's)."""

    model: str | None = None           # None: the package's all-MiniLM-L6-v2 folder
    task: str | None = None            # glue/<name>
    train_file: str | None = None
    validation_file: str | None = None
    glue_source: str = "nyu-mll/glue"
    max_length: int = DEFAULT_MAX_LENGTH
    train_examples: int | None = None
    val_examples: int | None = None
    split_seed: int = 0
    eval_batch: int = 64

    def __post_init__(self):
        if self.task is not None:
            classify._task_name(self.task)
        if (self.train_file is None) != (self.validation_file is None):
            raise ValueError("Invalid train_file / validation_file: give both (--train-file and --validation-file)")
        if self.task is None and self.train_file is None:
            raise ValueError("Invalid task: None (give --task glue/<name>, or --train-file and --validation-file)")
        if self.max_length < 3:
            raise ValueError(f"Invalid max_length: {self.max_length} (must be >= 3)")
        for name in ("train_examples", "val_examples", "eval_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid {name}: {value} (must be >= 1)")

    @property
    def model_path(self) -> str:
        if self.model is not None:
            return self.model
        from golore_lab.lm.minilm import model_path

        return str(model_path())


def load_examples(cfg: HFTaskConfig) -> dict[str, classify.Examples]:
    """``{"train", "validation"}`` of the configuration's data, subsampled (seeded) when asked."""
    from golore_lab.lm.finetune import subsample

    if cfg.train_file is not None:
        data = classify.read_labelled_file(cfg.train_file, cfg.validation_file, task=cfg.task)
    else:
        data = classify.load_glue(cfg.task, cfg.glue_source)
    for key, n, offset in (("train", cfg.train_examples, 0), ("validation", cfg.val_examples, 1)):
        ex = data[key]
        if n is not None and n < len(ex):
            keep = subsample(list(range(len(ex))), n, cfg.split_seed + offset)
            data[key] = classify.Examples([ex.texts[i] for i in keep], [ex.labels[i] for i in keep], ex.columns,
                                          ex.label_names)
    return data


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class HFClassificationTask:
    """Sequence classification with any ``AutoModelForSequenceClassification`` (the loop's ``Task`` protocol)."""

    def __init__(self, config: HFTaskConfig, data: dict[str, classify.Examples] | None = None):
        from transformers import AutoTokenizer

        self.config = config
        self.data = data or load_examples(config)
        self.num_labels = classify.num_labels(self.data, config.task)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot load the tokenizer of {config.model_path!r}: {str(err).splitlines()[0]}") from None
        self.max_length = config.max_length
        self._shape = None

    def build_model(self, seed: int) -> nn.Module:
        model, _ = classify.build_classifier(self.config.model_path, self.num_labels, seed=seed)
        self._shape = model.config
        return model

    def options(self) -> dict:
        """The task configuration, the number of labels, and the sha256 of the data files."""
        out = {**asdict(self.config), "num_labels": self.num_labels}
        for key in ("train_file", "validation_file"):
            if out[key] is not None:
                out[key + "_sha256"] = _sha256(out[key])
        return out

    def activation_bytes(self, micro_batch: int) -> int:
        """:func:`~golore_lab.lm.memory.bert_activation_bytes` at ``max_length`` tokens (call after
        :meth:`build_model`)."""
        from golore_lab.lm.memory import bert_activation_bytes

        return shape_activation_bytes(self._shape, micro_batch, self.max_length, self.config.eval_batch,
                                      bert_activation_bytes)

    def param_groups(self, model: nn.Module, **subspace) -> list[dict]:
        """``[{"params": the encoder blocks' linear weights, **subspace}, {"params": the rest}]``."""
        return subspace_groups(model, **subspace)

    def batch(self, start: int, count: int, seed: int) -> dict:
        """Stream positions ``start .. start + count - 1``, tokenized and padded; ``dropout_seed`` = f(seed, start)."""
        from golore_lab.lm.train import stream_indices

        index = stream_indices(start, count, len(self.data["train"]), seed).tolist()
        out = classify.batch(self.tokenizer, self.data["train"], index, self.max_length)
        out["dropout_seed"] = int(seed) * 1_000_003 + int(start)
        return out

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "dropout_seed"}
        device = inputs["input_ids"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch["dropout_seed"])
            return model(**inputs).loss

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = classify.evaluate(model, self.tokenizer, self.data["validation"], self.config.task,
                                    batch_size=self.config.eval_batch, max_length=self.max_length)
        return {f"val_{k}": v for k, v in metrics.items()}

    def test(self, model: nn.Module) -> dict[str, float]:
        """Nothing: GLUE's test splits have no labels (the validation metrics are the run's result)."""
        return {}


def subspace_groups(model: nn.Module, **subspace) -> list[dict]:
    mats = {id(m.weight) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and classify.encoder_linears(n, m)}
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if id(p) in mats], **subspace},
            {"params": [p for _, p in named if id(p) not in mats]}]


def shape_activation_bytes(config, micro_batch: int, max_length: int, eval_batch: int, estimate) -> int:
    return estimate(config.hidden_size, config.num_hidden_layers, config.intermediate_size, micro_batch, max_length,
                    eval_batch=eval_batch)


# ------------------------------------------------------------------------------------------------ the plan
def finetune_plan(plan, task_cfg: HFTaskConfig, cfg, data) -> None:
    """Fill ``plan`` (whose data check is done: ``data`` is the examples, or None when missing) with what
    ``finetune --recipe`` needs here besides the data: the model and tokenizer, the memory of a step and its
    measured time."""
    from . import memory
    from .paths import make_optimizer
    from .recipes import _agree, _plan_memory, check_input, measure_step_seconds, synchronise
    from .train import _device

    def load_config():
        from transformers import AutoConfig, AutoTokenizer

        AutoTokenizer.from_pretrained(task_cfg.model_path)
        return AutoConfig.from_pretrained(task_cfg.model_path)

    config = check_input(plan, "model", repr(task_cfg.model_path), load_config)
    if config is None:
        return
    from transformers import AutoModelForSequenceClassification

    labels = classify.num_labels(data, task_cfg.task) if data else 2
    config.num_labels = labels
    with torch.device("meta"):
        meta = AutoModelForSequenceClassification.from_config(config)
    device = _device(cfg)
    per_rank = max(1, cfg.batch_size // int(__import__("os").environ.get("WORLD_SIZE", "1")))
    fixed = memory.model_bytes(meta, subspace_groups(meta, **cfg.subspace), optimizer=cfg.optimizer,
                               momentum=cfg.momentum, subspace=not cfg.spec.full)
    acts = lambda m: shape_activation_bytes(config, m, task_cfg.max_length, task_cfg.eval_batch,  # noqa: E731
                                            memory.bert_activation_bytes)
    micro = _plan_memory(plan, memory, fixed, acts, device, per_rank, cfg.micro_batch_size)
    if not plan.fits:
        return
    model, _ = classify.build_classifier(task_cfg.model_path, labels, seed=cfg.seed)
    model.to(device).train()
    opt = make_optimizer(subspace_groups(model, **cfg.subspace), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    def step(p: int) -> None:
        ids = torch.randint(5, config.vocab_size, (p, task_cfg.max_length), generator=gen).to(device)
        y = (torch.rand(p, generator=gen) if labels == 1 else torch.randint(0, labels, (p,), generator=gen)).to(device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).loss.backward()
        synchronise(device)

    def optimizer_step() -> None:
        opt.step()
        synchronise(device)

    seconds, how = measure_step_seconds(step, optimizer_step, per_rank, micro,
                                        None if cfg.spec.full else cfg.update_proj_gap)
    plan.seconds_per_step, plan.timing = _agree(seconds, device), how + f" of {task_cfg.max_length} tokens on {device}"
