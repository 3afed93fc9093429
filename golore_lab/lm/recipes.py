"""The paper's runs as recipes of the programs, and what a recipe would need on this machine before it starts.

``python -m golore_lab pretrain --recipe paper-60m`` and ``python -m golore_lab finetune --recipe paper-glue`` are the
authors' README commands, option for option (:data:`PRETRAIN_RECIPES`, :data:`FINETUNE_RECIPES`); an option given
on the command line overrides the recipe's value. Correspondence (README option -> program option):

=========================================  =================================================================
Benchmark 1 (``torchrun_main.py``)          ``pretrain --recipe paper-60m``
=========================================  =================================================================
``pretokenize.py --dataset c4``            ``--data allenai/c4 --data-config en --val-split validation``
``--dataset_config en --text_field text``  ``--text-field text``
``--tokenizer t5-base``                    ``--tokenizer t5-base``
``--model_config configs/llama_60m.json``  ``--model-config llama_60m``
``--max_length 256``                       ``--seq-len 256``
``--total_batch_size 512``                 ``--batch-size 512`` (``--batch_size 128``: the micro-batch, here chosen
                                           from memory unless ``--micro-batch-size`` is given)
``--lr 0.001 --warmup_steps 1000``          ``--lr 1e-3 --warmup-steps 1000``
``--num_training_steps 10000``             ``--steps 10000`` (``--cycle_length 10000``: one cosine cycle)
``--rank 128 --update_proj_gap 200``       ``--rank 128 --update-proj-gap 200``
``--rand_ratio 0.8 --Golore``              ``--method golore@20`` (SVD for the first 80% of the steps)
``--optimizer adamw``                      ``--optimizer adamw``
``--eval_every 500``                       ``--eval-every 500``
=========================================  =================================================================

Where that command is silent the recipe takes the values of the paper's setting as its public material states
it for Figure 3 (bf16, gradient clipping 1, scale 1) and the package's own choices, labelled as such: a cosine
decay to 0.1 x lr (the ``min_lr_ratio`` of GaLore's scheduler), 1,000 validation windows of 256 tokens from C4's
validation split (at most 20,000 of its documents are tokenized), and a training corpus of at most
``steps x batch x seq_len`` x 1.05 tokens. ``paper-130m``, ``paper-350m`` and ``paper-1b`` are the same command
with ``--model_config configs/llama_{130m,350m,1b}.json`` and nothing else changed (the README has a command for
60M only); give ``--lr``, ``--rank``, ``--steps`` ... to run other settings.

=========================================  =================================================================
Benchmark 2 (``run_glue.py``)               ``finetune --recipe paper-glue``
=========================================  =================================================================
``--model_name_or_path roberta-base``      ``--model roberta-base``
``--task_name mrpc``                       ``--task glue/mrpc``
``--max_length 512 --seed 42``             ``--max-length 512 --seed 42``
``--lora_r 4 --scale 4``                   ``--rank 4 --scale 4``
``--per_device_train_batch_size 16``       ``--batch-size 16``
``--update_proj_gap 500``                  ``--update-proj-gap 500``
``--num_train_epochs 30``                  ``--epochs 30``
``--learning_rate 3e-5``                   ``--lr 3e-5``
``--enable_golore --rand_ratio 0.8``       ``--method golore@20``
``--lora_all_modules``                     every linear layer of the encoder blocks in the subspace
=========================================  =================================================================

and, where it is silent, the package's fine-tuning defaults (linear decay to 0, no warm-up, no weight decay,
gradient clipping 1, AdamW).

Before a recipe starts, :func:`plan` works out what it needs here: whether its data, tokenizer and model are
available (a hub name that cannot be reached offline is named), the memory of a step from
:mod:`golore_lab.lm.memory`'s estimate, and the time per step *measured* over a few forward/backward passes of
the real model on random inputs of the run's shape (:func:`measure_step_seconds`). A run whose inputs are missing,
that does not fit in memory, or whose estimated time exceeds ``--max-hours`` is not started: the program prints
the plan and exits with status 3. ``--plan-only`` prints the plan and exits (0 when the run could start).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

#: Exit status of a recipe that this machine cannot run (the plan says what it needs).
CANNOT_RUN = 3
#: ``--max-hours`` default: a recipe estimated to take longer is not started.
MAX_HOURS = 72.0

_BENCHMARK_1 = dict(
    data="allenai/c4", data_config="en", text_field="text", val_split="validation", tokenizer="t5-base",
    seq_len=256, eval_windows=1000, max_val_documents=20_000,
    train=dict(method="golore@20", optimizer="adamw", lr=1e-3, batch_size=512, steps=10_000, warmup_steps=1000,
               schedule="cosine", min_lr_ratio=0.1, rank=128, update_proj_gap=200, scale=1.0, grad_clip=1.0,
               bf16=True, eval_every=500, log_every=10, weight_decay=0.0),
)

#: ``pretrain --recipe NAME``: program options (the ``train`` dict: :class:`~golore_lab.lm.config.TrainConfig`
#: fields). See the module docstring for where each value comes from.
PRETRAIN_RECIPES: dict[str, dict] = {
    f"paper-{size}": {**_BENCHMARK_1, "model_config": f"llama_{size}"} for size in ("60m", "130m", "350m", "1b")
}

#: ``finetune --recipe NAME``.
FINETUNE_RECIPES: dict[str, dict] = {
    "paper-glue": dict(model="roberta-base", task="glue/mrpc", max_length=512, epochs=30.0,
                       train=dict(method="golore@20", optimizer="adamw", lr=3e-5, batch_size=16, rank=4, scale=4.0,
                                  update_proj_gap=500, seed=42)),
}


def corpus_token_budget(steps: int, batch_size: int, seq_len: int) -> int:
    """Training tokens a recipe reads from a streamed corpus: the tokens its steps consume, + 5%."""
    return math.ceil(1.05 * steps * batch_size * (seq_len + 1))


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What a run needs on this machine; :meth:`blockers` says why it cannot start (empty: it can)."""

    name: str
    steps: int | None                                         # None: unknown (set by the data, which is missing)
    inputs: dict[str, str] = field(default_factory=dict)      # what -> where it comes from
    missing: dict[str, str] = field(default_factory=dict)     # what -> why it is not available
    memory: str = ""                                          # the estimate, described
    fits: bool = True
    memory_note: str = ""
    seconds_per_step: float | None = None
    timing: str = ""
    max_hours: float = MAX_HOURS

    @property
    def hours(self) -> float | None:
        if self.seconds_per_step is None or self.steps is None:
            return None
        return self.seconds_per_step * self.steps / 3600

    def blockers(self) -> list[str]:
        out = [f"{what} is missing" for what in self.missing]
        if not self.fits:
            out.append(f"a step does not fit in memory ({self.memory_note})")
        if self.hours is not None and self.hours > self.max_hours:
            out.append(f"{self.steps:,} steps would take ~{_duration(self.hours)} here, more than --max-hours "
                       f"{self.max_hours:g}")
        return out

    def describe(self) -> str:
        lines = [f"recipe {self.name}: what it needs on this machine"]
        for what, where in self.inputs.items():
            state = f"MISSING: {self.missing[what]}" if what in self.missing else "available"
            lines.append(f"  {what}: {where} -- {state}")
        if self.memory:
            lines.append(f"  memory: {self.memory}" + ("" if self.fits else f" -- DOES NOT FIT: {self.memory_note}"))
        if self.seconds_per_step is not None:
            total = (f"{self.steps:,} steps ~{_duration(self.hours)}" if self.steps is not None
                     else "the step count depends on the data")
            lines.append(f"  time: {self.seconds_per_step:.3g} s per step ({self.timing}); {total}")
        elif "model" in self.missing:
            lines.append("  time: not measured (the model is missing)")
        blockers = self.blockers()
        if blockers:
            lines.append("  not started: " + "; ".join(blockers))
        return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.3g} min"
    if hours < 48:
        return f"{hours:.3g} h"
    return f"{hours / 24:.3g} days"


def check_input(plan: Plan, what: str, where: str, load: Callable[[], object]) -> object | None:
    """Record input ``what`` (from ``where``) in ``plan``; ``load()`` either returns it or raises (then it is missing)."""
    plan.inputs[what] = where
    try:
        return load()
    except Exception as err:  # a hub that cannot be reached raises many kinds
        text = str(err).strip().splitlines()
        plan.missing[what] = f"{type(err).__name__}: {text[0] if text else ''}"
        return None


def measure_step_seconds(step: Callable[[int], None], optimizer_step: Callable[[], None], per_rank: int,
                         micro: int, update_proj_gap: int | None, budget_s: float = 1.0,
                         repeats: int = 3) -> tuple[float, str]:
    """Seconds of one training step, measured: forward/backward of ``p`` examples (``step(p)``), ``p`` doubled
    from 1 until one pass takes ``budget_s`` or ``p`` reaches the micro-batch ``micro``; then ``repeats`` passes at
    that ``p`` (median) scaled to the rank's ``per_rank`` examples, plus the optimizer step (median of
    ``repeats`` after the first; the first, which computes the SVD bases, amortised over ``update_proj_gap``
    steps). Returns (seconds, how it was measured)."""
    p = 1
    while True:
        start = time.perf_counter()
        step(p)
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or p >= micro:
            break
        p = min(2 * p, micro)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(p)
        passes.append(time.perf_counter() - start)
    opt = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        optimizer_step()
        opt.append(time.perf_counter() - start)
    first, rest = opt[0], statistics.median(opt[1:])
    refresh = (first - rest) / update_proj_gap if update_proj_gap else 0.0
    seconds = statistics.median(passes) * per_rank / p + rest + max(0.0, refresh)
    how = (f"median of {repeats} forward/backward passes of {p} example{'s' * (p > 1)} x {per_rank // p if per_rank % p == 0 else per_rank / p:g}"
           f" + the optimizer step")
    return seconds, how


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ pre-training
def _data_check(options: dict) -> tuple[str, Callable[[], object]]:
    """Where the data comes from, and a loader that reads its first document (so a hub name is really reached)."""
    from .corpus import Source

    data = options["data"]
    source = Source.parse(data, options["text_field"], options["data_config"])
    if source.files:
        return f"{len(source.files)} local file(s) {data!r}", lambda: source.files
    where = f"datasets {data!r}" + (f" configuration {options['data_config']!r}" if options["data_config"] else "")
    where += f", train split" + (f" + {options['val_split']!r} split" if options["val_split"] else "")
    if options["max_tokens"]:
        where += f", first {options['max_tokens']:,} tokens"
    return where, lambda: next(iter(source.documents()))


def pretrain_plan(name: str, cfg, options: dict, model_cfg, max_hours: float = MAX_HOURS) -> Plan:
    """What ``pretrain --recipe name`` (resolved to ``cfg``, ``options``, ``model_cfg``) needs on this machine."""
    from . import memory
    from .corpus import load_tokenizer
    from .model import Llama, build_model, llama_param_groups
    from .paths import make_optimizer
    from .train import _device

    plan = Plan(name, cfg.steps, max_hours=max_hours)
    if options["data"] is None:
        plan.inputs["data"] = "the built-in corpus"
    else:
        where, load = _data_check(options)
        check_input(plan, "data", where, load)
        if options["val_data"] is not None:
            from .corpus import local_files

            check_input(plan, "validation data", repr(options["val_data"]), lambda: local_files(options["val_data"]))
    tokenizer = options["tokenizer"]
    if tokenizer is not None and not tokenizer.startswith("bpe"):
        check_input(plan, "tokenizer", repr(tokenizer), lambda: load_tokenizer(tokenizer))
    plan.inputs["model"] = (f"{options['model_config']}: " if options["model_config"] else "") + (
        f"d {model_cfg.dim}, {model_cfg.n_layers} layers, vocab {model_cfg.vocab_size}")

    device = _device(cfg)
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    per_rank = max(1, cfg.batch_size // world)
    seq = options["seq_len"] or model_cfg.max_seq_len
    with torch.device("meta"):
        meta = Llama(model_cfg)
    groups = llama_param_groups(meta, **cfg.subspace)
    fixed = memory.model_bytes(meta, groups, optimizer=cfg.optimizer, momentum=cfg.momentum,
                               subspace=not cfg.spec.full)
    activations = lambda m: memory.llama_activation_bytes(  # noqa: E731
        model_cfg.dim, model_cfg.n_layers, model_cfg.hidden_dim, model_cfg.vocab_size, m, seq,
        eval_batch=min(16, options["eval_windows"]))
    micro = _plan_memory(plan, memory, fixed, activations, device, per_rank, cfg.micro_batch_size)
    if not plan.fits:
        return plan

    model = build_model(model_cfg, cfg.seed).to(device)
    opt = make_optimizer(llama_param_groups(model, **cfg.subspace), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else _null

    def step(p: int) -> None:
        batch = torch.randint(0, model_cfg.vocab_size, (p, seq + 1), generator=gen).to(device)
        with autocast():
            logits = model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        synchronise(device)

    def optimizer_step() -> None:
        opt.step()
        synchronise(device)

    seconds, how = measure_step_seconds(step, optimizer_step, per_rank, micro, cfg.update_proj_gap
                                        if not cfg.spec.full else None)
    plan.seconds_per_step, plan.timing = _agree(seconds, device), how + f" on {device}"
    del model, opt
    return plan


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _plan_memory(plan: Plan, memory, fixed, activations, device, per_rank: int, given: int | None) -> int:
    available = memory.available_bytes(device)
    if available is not None and device.type == "cpu":
        available //= memory.local_world_size()
    need = lambda m: memory.StepMemory.of(fixed, activations(m))  # noqa: E731
    try:
        micro, note = memory.choose_micro_batch(per_rank, need, available, given)
    except MemoryError as err:
        plan.fits, plan.memory_note = False, str(err)
        plan.memory = f"{need(1).describe()} per process at micro-batches of 1"
        return 1
    have = "unknown" if available is None else f"{available / memory.GiB:.1f} GiB available"
    plan.memory = (f"{need(micro).describe()} per process at micro-batches of {micro} "
                   f"({per_rank // micro} accumulated per step); {have}")
    return micro


def _agree(seconds: float, device: torch.device) -> float:
    """Under torchrun every rank measures; all take the slowest, so they decide alike."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)
