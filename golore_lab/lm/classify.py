"""Any Hugging Face sequence classifier on GLUE or on local files, with GLUE's metrics, trained by SubspaceAdamW.

What ``finetune --model NAME_OR_PATH --task glue/<name>`` (or ``--train-file`` / ``--validation-file``) needs:

* **data** -- :func:`load_glue` reads a GLUE task through ``datasets`` (``nyu-mll/glue`` and the task name, or a
  local folder laid out like that repository, ``<folder>/<task>/<split>-*.parquet``); :func:`read_labelled_file`
  reads CSV, TSV or JSON Lines with GLUE's columns and a ``label`` column. Both give :class:`Examples`.
* **metrics** -- :func:`glue_metrics`, in numpy/scipy: accuracy; accuracy and F1 of class 1 for mrpc and qqp;
  Matthews correlation for cola; Pearson and Spearman correlations for stsb (a regression, one output). With more
  than one metric, ``combined_score`` is their mean (the package's summary of a task, as GLUE averages a task's
  metrics).
* **model** -- :func:`build_classifier`: ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` from a name
  or a saved folder (``num_labels=1`` and ``problem_type="regression"`` for stsb).
* **training** -- :func:`finetune`: a short, seeded loop (batches drawn by a ``torch.Generator``, padded per
  batch) with :class:`golore_lab.SubspaceAdamW` on the encoder's linear layers (:func:`encoder_linears`) and plain
  AdamW on the rest; the method (``galore``, ``golore@20`` ...) maps to param-group keys by
  :func:`golore_lab.integrations.method_group_keys`.

GLUE's layout (:data:`GLUE_TASKS`): text columns, number of labels, metrics, validation split
(``validation_matched`` for mnli). The test splits of GLUE carry no labels and are not read.

The paper's setting for RoBERTa-base on GLUE: rank 4, scale 4, batch 16, tau = 500, 30 epochs, lr 3e-5, GoLore@20%
(the defaults of :func:`finetune` except the step count).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class GlueTask:
    columns: tuple[str, ...]
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]
    validation: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("matthews_correlation",)),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
}

#: Column layouts recognised in local files, tried in this order.
LAYOUTS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"), ("question", "sentence"),
           ("sentence",), ("text",))


# --------------------------------------------------------------------------------------------- metrics
def accuracy(pred, label) -> float:
    pred, label = np.asarray(pred), np.asarray(label)
    return float((pred == label).mean())


def f1_binary(pred, label, positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN) (0 when there is no positive at all)."""
    pred, label = np.asarray(pred) == positive, np.asarray(label) == positive
    tp, fp, fn = int((pred & label).sum()), int((pred & ~label).sum()), int((~pred & label).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(pred, label) -> float:
    """Matthews correlation from the confusion matrix C (any number of classes; 0 when undefined):
    (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), c = trace C, s = sum C, t / p = true / predicted class counts."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = np.union1d(pred, label)
    C = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(C, (np.searchsorted(classes, label), np.searchsorted(classes, pred)), 1)
    t, p, c, s = C.sum(1), C.sum(0), np.trace(C), C.sum()
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def pearson(x, y) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0])


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0])


_METRICS: dict[str, Callable] = {"accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_corrcoef,
                                 "pearson": pearson, "spearmanr": spearman}


def glue_metrics(task: str | None, predictions, labels) -> dict[str, float]:
    """GLUE's metrics for ``task`` (``None``: accuracy, for local files without a task); ``combined_score`` when
    there are several. ``predictions`` are class ids (or scores for stsb)."""
    names = GLUE_TASKS[_task_name(task)].metrics if task else ("accuracy",)
    out = {name: _METRICS[name](predictions, labels) for name in names}
    if len(out) > 1:
        out["combined_score"] = float(np.mean(list(out.values())))
    return out


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Examples:
    """Labelled examples: ``texts`` (one tuple of 1 or 2 strings per example), ``labels`` (ints, or floats for a
    regression), the ``columns`` they came from, and ``label_names`` (None when labels were already ids)."""

    texts: list[tuple[str, ...]]
    labels: list
    columns: tuple[str, ...]
    label_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def _task_name(task: str) -> str:
    name = task.removeprefix("glue/").lower()
    if name not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task: {task!r} (choose from {', '.join('glue/' + t for t in GLUE_TASKS)})")
    return name


def _examples(records: Sequence[dict], columns: tuple[str, ...], where: str, regression: bool) -> Examples:
    if not records:
        raise ValueError(f"No examples in {where}")
    missing = [c for c in (*columns, "label") if c not in records[0]]
    if missing:
        raise ValueError(f"{where}: no column {missing[0]!r} (columns: {', '.join(map(repr, records[0]))})")
    texts = [tuple("" if r[c] is None else str(r[c]) for c in columns) for r in records]
    labels = [r["label"] for r in records]
    if regression:
        labels = [float(y) for y in labels]
    return Examples(texts, labels, columns)


def load_glue(task: str, source: str = "nyu-mll/glue", validation_split: str | None = None) -> dict[str, Examples]:
    """``{"train", "validation"}`` of a GLUE task through ``datasets``: ``load_dataset(source, task)``, or, when
    ``source`` is a local folder, its ``<task>/<split>-*.parquet`` files (the layout of the hub repository)."""
    import datasets

    name = _task_name(task)
    spec = GLUE_TASKS[name]
    splits = {"train": "train", "validation": validation_split or spec.validation}
    if Path(source).is_dir():
        files = {}
        for split in splits.values():
            found = sorted(glob.glob(os.path.join(source, name, f"{split}-*.parquet")))
            if not found:
                raise ValueError(f"No files {os.path.join(source, name, split + '-*.parquet')} for GLUE {name} {split}")
            files[split] = found
        loaded = datasets.load_dataset("parquet", data_files=files)
    else:
        try:
            loaded = datasets.load_dataset(source, name)
        except Exception as err:
            raise ValueError(f"datasets could not load {source!r} {name!r}: {type(err).__name__}: {err}") from None
    out = {}
    for key, split in splits.items():
        if split not in loaded:
            raise ValueError(f"GLUE {name} has no split {split!r} (splits: {', '.join(loaded)})")
        out[key] = _examples(loaded[split].to_list(), spec.columns, f"GLUE {name} {split}", spec.num_labels == 1)
    return out


def _read_records(path: Path) -> list[dict]:
    name = path.name.lower()
    if not path.is_file():
        raise ValueError(f"No such file: {str(path)!r}")
    if name.endswith((".jsonl", ".json")):
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"{path}:{number}: not JSON Lines ({err})") from None
        return records
    if name.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            tsv = name.endswith(".tsv")
            reader = csv.DictReader(handle, delimiter="\t" if tsv else ",",
                                    quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            return [dict(r) for r in reader]
    raise ValueError(f"Unsupported file: {str(path)!r} (CSV, TSV or JSON Lines: .csv, .tsv, .jsonl, .json)")


def _infer_columns(columns, where: str) -> tuple[str, ...]:
    for layout in LAYOUTS:
        if all(c in columns for c in layout):
            return layout
    raise ValueError(f"{where}: no text columns of a GLUE layout (one of "
                     f"{'; '.join('+'.join(x) for x in LAYOUTS)}) in {', '.join(map(repr, columns))}")


def _number(value, where: str):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number == int(number) else number


def read_labelled_file(train_file: str | Path, validation_file: str | Path,
                       task: str | None = None) -> dict[str, Examples]:
    """``{"train", "validation"}`` from CSV / TSV / JSON Lines files with GLUE's columns and ``label``.

    Columns: the task's (``task="glue/mrpc"``: sentence1, sentence2), else the first layout of :data:`LAYOUTS`
    present. Labels: integers >= 0 are class ids; any other text labels are class names, numbered in sorted order
    of the training file's names; non-integer numbers (or ``task`` stsb) make a regression.
    """
    records = {"train": _read_records(Path(train_file)), "validation": _read_records(Path(validation_file))}
    spec = GLUE_TASKS[_task_name(task)] if task else None
    for key, rows in records.items():
        if not rows:
            raise ValueError(f"No examples in {key} file {str(train_file if key == 'train' else validation_file)!r}")
    columns = spec.columns if spec else _infer_columns(list(records["train"][0]), str(train_file))
    raw = [r.get("label") for r in records["train"]]
    numbers = [_number(y, str(train_file)) for y in raw]
    regression = (spec is not None and spec.num_labels == 1) or (
        all(n is not None for n in numbers) and any(isinstance(n, float) for n in numbers))
    out = {k: _examples(rows, columns, f"{k} file", regression) for k, rows in records.items()}
    if regression:
        return out
    if all(isinstance(n, int) and n >= 0 for n in numbers):
        for key, ex in out.items():
            converted = [_number(y, key) for y in ex.labels]
            bad = next((y for y, n in zip(ex.labels, converted) if not (isinstance(n, int) and n >= 0)), None)
            if bad is not None:
                raise ValueError(f"Invalid label {bad!r} in the {key} file (labels are class ids >= 0 here)")
            ex.labels = converted
        return out
    names = tuple(sorted({str(y) for y in raw}))
    for key, ex in out.items():
        unknown = sorted({str(y) for y in ex.labels} - set(names))
        if unknown:
            raise ValueError(f"Label {unknown[0]!r} of the {key} file is not in the training labels {list(names)}")
        ex.labels = [names.index(str(y)) for y in ex.labels]
        ex.label_names = names
    return out


def num_labels(data: dict[str, Examples], task: str | None = None) -> int:
    """1 for a regression (stsb, float labels), else the number of classes."""
    if task:
        return GLUE_TASKS[_task_name(task)].num_labels
    labels = data["train"].labels
    if any(isinstance(y, float) for y in labels):
        return 1
    if data["train"].label_names:
        return len(data["train"].label_names)
    return int(max(max(ex.labels) for ex in data.values())) + 1


# ----------------------------------------------------------------------------------------------- model
def build_classifier(name_or_path: str, num_labels: int, seed: int = 0, **kwargs) -> tuple[nn.Module, Any]:
    """``AutoModelForSequenceClassification`` and ``AutoTokenizer`` from a hub name or a saved folder.

    The new classification head is initialised by ``transformers`` from torch's global generator, here forked and
    seeded with ``seed`` (so the head depends on ``seed`` only, and the caller's generator is untouched).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = {"problem_type": "regression"} if num_labels == 1 else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels,
                                                                       **extra, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    return model, tokenizer


def encoder_linears(name: str, module: nn.Module) -> bool:
    """The default subspace targets: ``nn.Linear`` layers inside the numbered blocks (``...layer.3.attention...``,
    ``...layers.3....``), i.e. attention and feed-forward matrices, not the pooler or the classification head."""
    import re

    return re.search(r"(^|\.)layers?\.\d+\.", name) is not None


def batch(tokenizer, examples: Examples, index: Sequence[int], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize and pad the chosen examples to their longest; ``labels`` long (or float for a regression)."""
    columns = list(zip(*[examples.texts[i] for i in index]))
    enc = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt")
    labels = [examples.labels[i] for i in index]
    dtype = torch.float32 if any(isinstance(y, float) for y in examples.labels) else torch.long
    enc["labels"] = torch.tensor(labels, dtype=dtype)
    return dict(enc)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: Examples, task: str | None = None, batch_size: int = 64,
             max_length: int = 128) -> dict[str, float]:
    """GLUE's metrics (:func:`glue_metrics`) and the mean loss of ``model`` on ``examples`` (eval mode, restored)."""
    was_training = model.training
    model.eval()
    preds, total = [], 0.0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in batch(tokenizer, examples, range(start, min(start + batch_size, len(examples))),
                                                max_length).items()}
        out = model(**b)
        total += float(out.loss) * len(b["labels"])
        logits = out.logits
        preds.append(logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1))
    model.train(was_training)
    predictions = torch.cat(preds).cpu().numpy()
    return {"loss": total / len(examples), **glue_metrics(task, predictions, examples.labels)}


def finetune(model: nn.Module, tokenizer, train: Examples, *, steps: int, batch_size: int = 16, lr: float = 3e-5,
             method: str = "golore@20", rank: int = 4, scale: float = 4.0, update_proj_gap: int = 500,
             weight_decay: float = 0.0, max_length: int = 128, seed: int = 0,
             target_modules: Any = encoder_linears, max_grad_norm: float | None = 1.0) -> dict[str, Any]:
    """Train ``model`` for ``steps`` steps on ``train`` with SubspaceAdamW; return the optimizer and the losses.

    Batches: examples are visited epoch by epoch in orders drawn by a ``torch.Generator`` seeded with ``seed``.
    ``method="full"`` is plain AdamW for every parameter (the same optimizer class, no rank group).
    """
    from golore_lab import SubspaceAdamW, subspace_param_groups
    from golore_lab.integrations import method_group_keys

    if steps < 1 or batch_size < 1:
        raise ValueError(f"Invalid steps/batch_size: {steps}/{batch_size} (must be >= 1)")
    keys = method_group_keys(method, steps)
    if keys is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        groups = subspace_param_groups(model, rank=rank, target_modules=target_modules,
                                       update_proj_gap=update_proj_gap, scale=scale, seed=seed, **keys)
    opt = SubspaceAdamW(groups, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    device = next(model.parameters()).device
    # Dropout draws from torch's global generator: fork it and seed it, so the run is a function of ``seed``
    # and the caller's generator is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        _loop(model, tokenizer, train, opt, generator, order, losses, steps, batch_size, max_length, max_grad_norm,
              device)
    return {"optimizer": opt, "losses": losses}


def _loop(model, tokenizer, train, opt, generator, order, losses, steps, batch_size, max_length, max_grad_norm,
          device) -> None:
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(torch.randperm(len(train), generator=generator).tolist())
        index, order = order[:batch_size], order[batch_size:]
        b = {k: v.to(device) for k, v in batch(tokenizer, train, index, max_length).items()}
        loss = model(**b).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
