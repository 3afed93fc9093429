"""Fine-tune all-MiniLM-L6-v2 on a text-classification task -- ``python -m golore_lab finetune``.

The CPU stand-in for the paper's RoBERTa/GLUE (Table 2) and LLaMA2-7B/MSGD (Figure 4) runs: the model is
:mod:`golore_lab.lm.classifier`, the data :mod:`golore_lab.lm.classification`. This module only defines the
*task* -- model, resumable batches, loss, evaluation -- and hands it to the shared training loop
(:mod:`golore_lab.lm.train`), which owns the optimizer (Full / GaLore / GoLore@x% / large-batch GaLore with
AdamW or momentum SGD), schedule, clipping, checkpoints and ``--resume``, metrics files, progress bar and
``torchrun``.

Batches: the training split is pre-tokenised once (truncated to ``max_length`` tokens, no padding) and each
batch is padded to its own longest sequence. Epoch ``e`` visits the examples in the order of
``randperm(n, Generator(seed + 1000003·e))``, so the batch at (epoch, index) is a pure function of the seed:
resuming needs only the step count, and under DDP rank ``k`` of ``W`` takes every ``W``-th batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from golore_lab.lm.classification import Splits, accuracy, load_splits, macro_f1

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
                   batch_size: int = 64) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of ``model`` on ``data`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    # Sorting by length keeps padding small; metrics do not depend on the order.
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    losses, preds, targets = [], [], []
    for start in range(0, len(order), batch_size):
        b = data.batch(order[start : start + batch_size], pad_id)
        logits = model(b["input_ids"], b["attention_mask"])
        losses.append(F.cross_entropy(logits, b["labels"], reduction="sum"))
        preds.append(logits.argmax(-1))
        targets.append(b["labels"])
    model.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)
    return {"loss": torch.stack(losses).sum().item() / len(data), "accuracy": accuracy(pred, target),
            "macro_f1": macro_f1(pred, target, num_labels)}


@dataclass
class FinetuneConfig:
    """What defines a fine-tuning task instance (the optimizer settings belong to the training loop)."""

    task: str = "movie-reviews"
    max_length: int | None = None  # None: MAX_LENGTH[task]
    train_examples: int | None = None  # subsample the training split (seeded by split_seed); None: all
    eval_examples: int | None = None  # subsample validation (per-epoch metric) only; the test split is never cut
    batch_size: int = 16
    split_seed: int = 0
    seed: int = 0  # head initialisation and batch order


@dataclass
class ClassificationTask:
    """A fine-tuning task: the model, resumable training batches, the loss and the evaluation.

    Build with :meth:`from_config`. ``splits`` are the full splits; ``train``/``val``/``test`` the encoded
    (possibly subsampled) ones.
    """

    config: FinetuneConfig
    splits: Splits
    tokenizer: object
    train: Encoded
    val: Encoded
    test: Encoded
    model: torch.nn.Module = field(repr=False, default=None)

    @classmethod
    def from_config(cls, config: FinetuneConfig, build_model: bool = True) -> "ClassificationTask":
        from golore_lab.lm.classifier import load_classifier, load_tokenizer

        splits = load_splits(config.task, split_seed=config.split_seed)
        tok = load_tokenizer()
        max_length = config.max_length or MAX_LENGTH[config.task]
        train = encode(subsample(splits.train, config.train_examples, config.split_seed), tok, max_length)
        val = encode(subsample(splits.val, config.eval_examples, config.split_seed + 1), tok, max_length)
        test = encode(splits.test, tok, max_length)
        model = load_classifier(splits.num_labels, seed=config.seed) if build_model else None
        return cls(config, splits, tok, train, val, test, model)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of the training examples in ``epoch`` (a seeded permutation)."""
        gen = torch.Generator().manual_seed(self.config.seed + 1_000_003 * epoch)
        return torch.randperm(len(self.train), generator=gen)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The training batch of global step ``step`` (epoch = step // steps_per_epoch); pure in ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        bs = self.config.batch_size
        return self.train.batch(order[index * bs : (index + 1) * bs].tolist(), self.pad_id)

    def batches(self, start_step: int = 0, rank: int = 0, world_size: int = 1):
        """Endless iterator of training batches from ``start_step`` on; rank ``k`` of ``W`` gets steps ≡ k mod W."""
        step = start_step * world_size + rank
        while True:
            yield self.batch(step)
            step += world_size

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def evaluate(self, model: torch.nn.Module, split: str = "val") -> dict[str, float]:
        """``loss``, ``accuracy``, ``macro_f1`` on ``split`` ('val' or 'test')."""
        data = {"val": self.val, "test": self.test}[split]
        return evaluate_model(model, data, self.splits.num_labels, self.pad_id)
