"""How much memory a training step needs, how much the machine has, and the micro-batch that fits.

A step's peak resident memory is estimated, in bytes (float32, 4 bytes a number), as::

    peak = weights + gradients + optimizer state + ALLOCATOR x activations of one micro-batch + RUNTIME
           + HEAP x weights

* weights: every parameter and buffer of the model (with the wrapper path: frozen W, bases P and factors B);
* gradients: every trainable parameter (the matrices of a subspace optimizer get full-size gradients too);
* optimizer state: AdamW keeps two moments, momentum SGD one; a subspace matrix of shape (m, n) at rank r keeps
  them in the subspace, r · max(m, n) numbers each, plus its basis, r · min(m, n);
* activations: the tensors autograd keeps between forward and backward for one micro-batch of b examples of T
  tokens, counted layer by layer for the two models of the package (:func:`llama_activation_bytes`,
  :func:`bert_activation_bytes`), or an evaluation batch if that is larger. :data:`ALLOCATOR` turns tensor bytes
  into resident bytes, :data:`RUNTIME` is what the first forward and backward add besides tensors.

Gradient accumulation makes the activations -- the only term that grows with the batch -- a function of the
micro-batch alone, so a step that does not fit is made to fit by a smaller micro-batch (:func:`choose_micro_batch`)
with the same batch and the same result up to the order of floating-point sums.

What the machine has (:func:`available_bytes`): on CUDA the free device memory (``torch.cuda.mem_get_info``); on
the CPU the kernel's estimate of memory available without swapping (``MemAvailable`` in ``/proc/meminfo``, or
psutil's where there is no ``/proc``), capped by the cgroup's limit when the process runs in a container.

The estimate is checked against the growth of peak resident memory (``VmHWM``) over a few real steps in a fresh
process (``tests/test_memory.py``). :data:`ALLOCATOR` is the measured slope of that peak in the activation bytes;
with it the LLaMA presets' peaks are 0.62-0.85 of the estimate and the MiniLM classifier's 0.79-0.88 (the tests
hold 0.5-1.3). What is left of the over-count is :data:`RUNTIME`, a constant: the intercept of the same fit is
about 44 MiB at the CPU preset's widths, while at LLaMA-60M widths the non-tensor part of the peak was 33-188 MiB.
With activation checkpointing at the LLaMA widths of ``bench/memory.py`` (60M, 350M, 1B; vocabulary 32k, one
sequence of 256 tokens) the estimate -- layer-wise and wrapper paths included -- is compared with the measured
peak in ``docs/benchmarks.md``. The check keeps a quarter of the available memory in reserve (:data:`HEADROOM`)
for the spread.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

GiB = 2 ** 30
MiB = 2 ** 20
#: Share of the available memory a step may plan to use; the rest covers the estimate's spread (+-30%) and
#: other processes starting meanwhile.
HEADROOM = 0.75
FLOAT = 4
#: Resident bytes per byte of activation tensors. glibc keeps freed blocks smaller than its mmap threshold
#: (which grows with the blocks freed, up to 32 MiB) in the heap, so during the backward the activations being
#: freed and the gradients being allocated do not share pages. Calibrated as the slope of the measured peak in
#: the activation bytes (the CPU preset at micro-batches 16 and 32, which differ in nothing else): 1.35-1.48
#: over repeated fresh-process runs (``tests/test_memory.py``); it was 2.0 before, which over-counted the
#: activation-dominated steps by a third to a half.
ALLOCATOR = 1.5
#: The same with activation checkpointing (``--checkpoint-activations``), at the LLaMA widths of
#: ``bench/memory.py``: what stays alive at the peak is a few large tensors (the head's (T, V) ones, 31-33 MiB,
#: at glibc's mmap ceiling), which come from and go back to the kernel whole; measured 1.0 there.
ALLOCATOR_CHECKPOINTED = 1.0
#: What a process's first forward and backward add besides tensors (kernel workspaces, thread pools, the autograd
#: engine): 85-115 MiB measured on the small presets.
RUNTIME = 96 * MiB
#: What the C library's heap keeps resident besides live tensors, per byte of weights: freed gradient- and
#: update-sized blocks (a few MiB to 40 MiB, one per matrix, below glibc's mmap ceiling) that the heap holds and
#: reuses unevenly. Calibrated on the checkpointed steps of ``bench/memory.py`` (LLaMA 60M, 350M and 1B widths,
#: every path): there the peak exceeded the other terms by up to 0.41 of the gradient bytes at 60M and by
#: 0.18-0.29 at 350M and 1B; with it the estimate is within 10% in 16 of 17 configurations. On CUDA, torch's
#: caching allocator has no such term (``bench/memory.py`` drops it with the runtime term).
HEAP = 0.25


@dataclass(frozen=True)
class StepMemory:
    """The terms of a step's peak memory, in bytes."""

    weights: int
    gradients: int
    optimizer: int     # the rule's state (moments)
    activations: int   # resident bytes: ALLOCATOR x the activation tensors
    runtime: int = RUNTIME
    bases: int = 0      # the subspace matrices' bases P (optimizer path; the wrapper's are among its weights)
    workspace: int = 0  # the optimizer step's temporaries
    heap: int = 0       # the C heap's resident slack (HEAP x weights)

    @classmethod
    def of(cls, fixed: tuple[int, ...], activation_tensors: int, allocator: float = None) -> "StepMemory":
        """From a path's fixed bytes ((weights, gradients, state[, bases[, workspace]]), :func:`model_bytes`) and a
        task's activation tensor bytes, made resident by ``allocator`` (default :data:`ALLOCATOR`)."""
        weights, gradients, state, bases, workspace = (*fixed, 0, 0)[:5]
        factor = ALLOCATOR if allocator is None else allocator
        return cls(weights, gradients, state, int(factor * activation_tensors), bases=bases, workspace=workspace,
                   heap=int(HEAP * weights))

    @property
    def total(self) -> int:
        return sum(self.terms().values())

    def terms(self) -> dict[str, int]:
        """The terms by name (what ``bench/memory.py`` tabulates)."""
        return {"weights": self.weights, "gradients": self.gradients, "state": self.optimizer, "bases": self.bases,
                "activations": self.activations, "workspace": self.workspace, "runtime": self.runtime,
                "heap": self.heap}

    def describe(self) -> str:
        return (f"~{self.total / GiB:.2f} GiB (weights {self.weights / GiB:.2f} + gradients {self.gradients / GiB:.2f}"
                f" + optimizer state {(self.optimizer + self.bases + self.workspace) / GiB:.2f} + activations "
                f"{self.activations / GiB:.2f} + runtime and heap {(self.runtime + self.heap) / GiB:.2f})")


def model_bytes(model: nn.Module, groups: list[dict], *, optimizer: str, momentum: float,
                subspace: bool, layerwise: str | None = None) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer state, bases) in bytes for ``model`` trained over ``groups``.

    ``subspace``: group 0 holds subspace matrices with a ``rank`` key (the optimizer path of GaLore / GoLore);
    otherwise every parameter keeps full-size state (full training, and the wrapper path, whose groups hold the
    low-rank factors themselves). ``layerwise`` (:mod:`golore_lab.optim.layerwise`): ``"single"`` -- one
    micro-batch, each gradient freed by its own hook: the largest gradient; ``"subspace"`` -- several, GoLore's
    matrices accumulating r-sized sums: the full-space gradients, those sums and the largest gradient (the one
    being projected); ``"gradient"`` -- several, with SVD refreshes (which accumulate every gradient at a refresh
    step): every gradient, as without layer-wise.
    """
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = [p for group in groups for p in group["params"]]
    sizes = [p.numel() * p.element_size() for p in trainable]
    moments = 2 if optimizer == "adamw" else (1 if momentum else 0)
    state = bases = accumulators = full_gradients = 0
    for i, group in enumerate(groups):
        for p in group["params"]:
            if subspace and i == 0 and p.ndim == 2:
                r = min(int(group["rank"]), *p.shape)
                state += moments * r * max(p.shape) * p.element_size()
                bases += r * min(p.shape) * p.element_size()
                accumulators += r * max(p.shape) * p.element_size()
            else:
                state += moments * p.numel() * p.element_size()
                full_gradients += p.numel() * p.element_size()
    gradients = {None: sum(sizes), "gradient": sum(sizes), "single": max(sizes, default=0),
                 "subspace": full_gradients + accumulators + max(sizes, default=0)}[layerwise]
    return weights, gradients, state, bases


def llama_activation_bytes(dim: int, n_layers: int, hidden_dim: int, vocab_size: int, batch: int, seq_len: int,
                           eval_batch: int = 0, checkpoint: bool = False) -> int:
    """Bytes autograd keeps for one micro-batch of the LLaMA of :mod:`golore_lab.lm.model`, N = batch · seq_len.

    Per layer (d = dim, h = hidden_dim), in numbers per token: the attention norm's input and output (2d), the
    rotated q and k, v, the attention output and its head-merged copy (5d; the CPU and flash kernels keep no T x T
    matrix), the MLP norm's input and output (2d), and the SwiGLU's gate, up, silu(gate) and product (4h). Then
    the final norm (2d) and, at the head, the log-softmax output, its incoming gradient and the logits' gradient
    (3V). ``checkpoint`` (activation checkpointing): each layer keeps its input (d) and one layer at a time is
    recomputed in the backward (9d + 4h), after the head's tensors are freed: n_layers d + max(2d + 3V, 9d + 4h).
    An evaluation batch (no autograd) holds its logits and their log-softmax (2V per token); the larger of the
    two is returned.
    """
    head, block = 2 * dim + 3 * vocab_size, 9 * dim + 4 * hidden_dim
    per_token = n_layers * dim + max(head, block) if checkpoint else n_layers * block + head
    train = batch * seq_len * per_token
    evaluation = eval_batch * seq_len * 2 * vocab_size
    return FLOAT * max(train, evaluation)


def bert_activation_bytes(dim: int, n_layers: int, intermediate: int, batch: int, seq_len: int,
                          eval_batch: int = 0) -> int:
    """Bytes autograd keeps for one micro-batch of a BERT encoder (all-MiniLM-L6-v2 of the fine-tuning task).

    Per layer (d = hidden, h = intermediate), numbers per token: q, k, v and the attention output, its merged copy,
    the output projection's residual sum and LayerNorm output, the MLP's residual sum (8d), the intermediate
    projection and its GELU (2h) -- the fused attention kernel keeps no T x T matrix. Plus the embeddings' sum and
    LayerNorm (3d per token). An evaluation batch (no autograd) holds one layer's tensors at a time (4d + h).
    """
    train = batch * seq_len * (n_layers * (8 * dim + 2 * intermediate) + 3 * dim)
    evaluation = eval_batch * seq_len * (4 * dim + intermediate)
    return FLOAT * max(train, evaluation)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_available() -> int | None:
    """Room left under the cgroup (v2) memory limit of this process, if it has one."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        folder = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on ``device`` (None if unknown); see the module docstring."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(found) if found else None


def choose_micro_batch(per_rank: int, need: Callable[[int], StepMemory], available: int | None,
                       given: int | None) -> tuple[int, str | None]:
    """The micro-batch to train with, and a note for the user (None when there is nothing to say).

    ``per_rank``: examples each rank sees per step; ``need(m)``: the step's memory with micro-batches of m;
    ``given``: the micro-batch the user asked for (None: choose). Candidates are the divisors of ``per_rank``
    (so accumulation keeps the batch exactly). Raises ``MemoryError`` naming the largest micro-batch that fits
    when ``given`` does not, or the smallest step when even a micro-batch of 1 does not.
    """
    first = given or per_rank
    if available is None:
        return first, None
    budget = HEADROOM * available
    if need(first).total <= budget:
        return first, None
    largest = next((m for m in divisors(per_rank) if m <= first and need(m).total <= budget), None)
    fits = [] if largest is None else [largest]   # need(m) grows with m: the first that fits is the largest
    have = f"{available / GiB:.2f} GiB available ({HEADROOM:.0%} of it may be planned)"
    if not fits:
        raise MemoryError(f"a step needs {need(1).describe()} even with micro-batches of 1 example, and the machine "
                          f"has {have}: use a smaller model, sequence length or evaluation batch, or a larger machine")
    if given is not None:
        raise MemoryError(f"a step with --micro-batch-size {given} needs {need(given).describe()}, and the machine "
                          f"has {have}: use --micro-batch-size {fits[0]} (same batch, more accumulation)")
    return fits[0], (f"memory: a step with micro-batches of {first} needs {need(first).describe()}, the machine has "
                     f"{have}; training with micro-batches of {fits[0]} ({per_rank // fits[0]} accumulated per step, "
                     "same batch)")


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` >= 1, largest first, in O(sqrt n) (the micro-batch candidates)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
