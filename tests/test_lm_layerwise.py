"""The training programs with ``layerwise`` and ``checkpoint_activations``: the same runs as without (bit for bit
with one micro-batch), accumulation within rounding, resume, the refusals, a non-finite gradient stopping the
run, and the memory estimate they choose micro-batches from."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from golore_lab.lm import memory
from golore_lab.lm.config import TrainConfig
from golore_lab.lm.pretrain import recipe
from golore_lab.lm.train import RunError, train


def config(method: str, **overrides) -> TrainConfig:
    return recipe("tiny", method=method, steps=8, warmup_steps=1, rank=4, update_proj_gap=3, eval_every=4,
                  grad_clip=0.0, progress=False, **overrides)


def weights(result):
    return [t.clone() for t in result.model.state_dict().values()]


@pytest.mark.parametrize("method", ["galore", "golore@100", "golore@50"])
def test_layerwise_and_checkpointing_train_the_same_run(task, method):
    """One micro-batch: layer-wise steps and recomputed blocks change nothing, bit for bit (8 steps, refreshes
    at 0, 3, 6)."""
    plain = weights(train(task, config(method)))
    for flags in (dict(layerwise=True), dict(checkpoint_activations=True),
                  dict(layerwise=True, checkpoint_activations=True)):
        assert all(torch.equal(a, b) for a, b in zip(plain, weights(train(task, config(method, **flags))))), flags


@pytest.mark.parametrize("method", ["galore", "golore@100", "lb-galore"])
def test_layerwise_accumulation_follows_the_ordinary_step(task, method):
    """Micro-batches of 2 out of 8 (4 accumulated; L.B. GaLore 16 at a refresh): float32 sums in another order.
    The weights move by ~1e-1 over the run; the two runs differ by float32 rounding amplified over 8 steps
    (measured below 1e-5), far from the 1e-3 of one step taken differently at lr 3e-3."""
    ordinary = weights(train(task, config(method, micro_batch_size=2)))
    in_backward = weights(train(task, config(method, micro_batch_size=2, layerwise=True)))
    assert max(float((a - b).abs().max()) for a, b in zip(ordinary, in_backward)) < 1e-4


def test_layerwise_resume_is_exact(task, tmp_path):
    cfg = config("golore@100", layerwise=True, micro_batch_size=4, out_dir=str(tmp_path / "run"))
    whole = weights(train(task, cfg))
    train(task, replace(cfg, out_dir=str(tmp_path / "cut"), stop_at=4))
    resumed = weights(train(task, replace(cfg, out_dir=str(tmp_path / "cut"), resume=True)))
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))


def test_refusals_are_named():
    with pytest.raises(ValueError, match="Invalid grad_clip: 1.0 with layerwise .* use --grad-clip 0"):
        TrainConfig(method="galore", layerwise=True, grad_clip=1.0)
    with pytest.raises(ValueError, match="Invalid layerwise: True with path 'wrapper'"):
        TrainConfig(method="galore", layerwise=True, grad_clip=0.0, path="wrapper")
    assert recipe("tiny", method="galore", layerwise=True).grad_clip == 0.0   # the recipe's default with it
    assert recipe("tiny", method="galore").grad_clip == 1.0


def test_nonfinite_gradient_in_backward_stops_the_run(task, monkeypatch, tmp_path):
    """The step refused inside backward() stops the run as a divergence, naming the parameter and the step."""
    loss = type(task).loss
    calls = []

    def poisoned(self, model, batch):
        calls.append(1)
        value = loss(self, model, batch)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(type(task), "loss", poisoned)
    with pytest.raises(RunError, match=r"Non-finite gradient in parameter .* at step 3: the run diverged"):
        train(task, config("golore@100", layerwise=True, out_dir=str(tmp_path / "run"), checkpoint_every=1))


def test_estimate_counts_what_layerwise_frees(task):
    """Layer-wise with one micro-batch keeps one gradient at a time; GoLore with several keeps the full-space
    gradients and r-sized sums; with SVD refreshes, every gradient (a refresh step accumulates them all)."""
    from golore_lab.lm.paths import make_path

    device = torch.device("cpu")
    plain = make_path(task, config("golore@100"), device, 1, 0)
    lw = make_path(task, config("golore@100", layerwise=True), device, 1, 0)
    svd = make_path(task, config("galore", layerwise=True), device, 1, 0)
    sizes = [p.numel() * 4 for g in plain.groups for p in g["params"]]
    full_space = sum(p.numel() * 4 for p in plain.groups[1]["params"])
    accumulators = sum(4 * 4 * max(p.shape) for p in plain.groups[0]["params"])
    assert plain.fixed_bytes(1)[1] == sum(sizes)
    assert lw.fixed_bytes(1)[1] == max(sizes)
    assert lw.fixed_bytes(4)[1] == full_space + accumulators + max(sizes)
    assert svd.fixed_bytes(4)[1] == sum(sizes)
    assert lw.fixed_bytes(1)[2:] == plain.fixed_bytes(1)[2:4]   # same state and bases


def test_checkpointed_activations_count_one_block():
    kw = dict(dim=512, n_layers=8, hidden_dim=1376, vocab_size=32000, batch=1, seq_len=256)
    full = memory.llama_activation_bytes(**kw)
    ckpt = memory.llama_activation_bytes(**kw, checkpoint=True)
    assert full == 4 * 256 * (8 * (9 * 512 + 4 * 1376) + 2 * 512 + 3 * 32000)
    assert ckpt == 4 * 256 * (8 * 512 + 2 * 512 + 3 * 32000)
