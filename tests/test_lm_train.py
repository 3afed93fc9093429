"""The generic training loop on the tiny LLaMA: every method learns, resume is exact, DDP matches one process."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from golore_lab.lm.pretrain import main, recipe
from golore_lab.lm.train import TrainConfig, lr_factor, stream_indices, train
from lm_helpers import VOCAB


def small(**overrides) -> TrainConfig:
    return recipe("tiny", **{"steps": 12, "warmup_steps": 2, "rank": 4, "update_proj_gap": 4, "eval_every": 6,
                             "log_every": 3, "progress": False, **overrides})


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("method", ["full", "galore", "golore@20", "lb-galore"])
def test_every_method_lowers_the_loss(task, method, optimizer):
    result = train(task, small(method=method, optimizer=optimizer))
    assert result.step == 12
    assert result.final["val_loss"] < result.history[0]["val_loss"] - 0.1


@pytest.mark.parametrize("method, optimizer", [("golore@50", "adamw"), ("lb-galore", "sgd")])
def test_resume_is_bit_identical(task, tmp_path, method, optimizer):
    cfg = small(method=method, optimizer=optimizer, steps=10, eval_every=5)
    straight = train(task, replace(cfg, out_dir=str(tmp_path / "a")))
    train(task, replace(cfg, out_dir=str(tmp_path / "b"), stop_at=4))
    resumed = train(task, replace(cfg, out_dir=str(tmp_path / "b"), resume=True))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("step", "examples", "tokens", "lr", "train_loss", "val_loss")
    assert [{k: r.get(k) for k in keep} for r in straight.history] == [{k: r.get(k) for k in keep} for r in resumed.history]
    assert (tmp_path / "b" / "metrics.csv").read_text().count("\n") == len(straight.history) + 1
    with pytest.raises(ValueError, match="another configuration.*lr"):
        train(task, replace(cfg, out_dir=str(tmp_path / "b"), resume=True, lr=0.5))


def test_stream_is_a_permutation_per_epoch():
    first = stream_indices(0, 50, 50, seed=3)
    assert sorted(first.tolist()) == list(range(50))
    assert torch.equal(stream_indices(37, 20, 50, seed=3)[:13], first[37:])
    assert not torch.equal(stream_indices(50, 50, 50, seed=3), first)


def test_schedule_warmup_cosine_linear():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, replace(cfg, schedule="linear")) == pytest.approx(0.55)
    assert lr_factor(77, replace(cfg, schedule="linear")) == pytest.approx(0.1 + 0.9 * 23 / 90)


@pytest.mark.parametrize("argv, message", [
    (["--method", "adam"], "Invalid method: 'adam'"),
    (["--method", "golore"], "write 'golore@100' for pure GoLore"),
    (["--method", "golore@0"], "Invalid method: 'golore@0'"),
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--lr", "0"], "Invalid lr: 0.0"),
    (["--rank", "0"], "Invalid rank: 0"),
    (["--switch-fraction", "0.5"], "unrecognized arguments: --switch-fraction"),
    (["--resume", "--overwrite", "--out", "x"], "Invalid overwrite: True with resume"),
    (["--warmup-steps", "500"], "Invalid warmup_steps: 500"),
    (["--model", "cpu", "--batch-size", "3", "--micro-batch-size", "2"], "Invalid batch_size: 3"),
])
def test_bad_cli_values_are_named(argv, message, capsys, corpus_root):
    with pytest.raises(SystemExit):
        main(argv + ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, value", [("lr", float("inf")), ("lr", float("nan")), ("eps", float("inf")),
                                         ("grad_clip", float("nan")), ("scale", float("-inf"))])
def test_non_finite_hyper_parameters_are_named(name, value):
    with pytest.raises(ValueError, match=rf"Invalid {name}: {value} \(must be a finite number\)"):
        TrainConfig(**{name: value})


def test_the_method_is_parsed_and_recorded():
    cfg = TrainConfig(method="golore@25", steps=100)
    assert cfg.switch_step == 75 and TrainConfig(method="galore").switch_step is None
    with pytest.raises(ValueError, match="write 'golore@100' for pure GoLore"):
        TrainConfig(method="golore")
