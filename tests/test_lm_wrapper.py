"""The training loop's wrapper path (``path="wrapper"``): SubspaceModel + torch.optim follows the optimizer path.

Clipping is off in the comparisons on purpose: the wrapper path clips the gradients the torch optimizer sees --
the factors' PᵀG, whose norm is at most ‖G‖ -- where the optimizer path clips the full G, so with a clip that
bites the two paths take different steps (documented in ``golore_lab.lm.train``). Everything else is the same
algorithm with the same seeds, so they agree to float32 round-off. The 2-rank DDP run is in test_lm_ddp.py.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from golore_lab.lm.model import build_model
from golore_lab.lm.pretrain import LMTask, main, recipe
from golore_lab.lm.train import TrainConfig, train
from golore_lab.wrapper import SubspaceLinear, SubspaceModel
from lm_helpers import VOCAB


def small(**overrides) -> TrainConfig:
    """8 steps, refreshes at 0, 3, 6; GoLore's switch at step 4 (its step-6 refresh is random, before the forward)."""
    return recipe("tiny", **{"steps": 8, "warmup_steps": 2, "rank": 4, "update_proj_gap": 3,
                             "eval_every": 4, "log_every": 2, "grad_clip": 0.0, "progress": False, **overrides})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("method", ["galore", "golore@50", "lb-galore"])
def test_wrapper_path_follows_optimizer_path(task, method, optimizer):
    cfg = small(method=method, optimizer=optimizer, weight_decay=0.1 if optimizer == "adamw" else 0.0)
    ref = train(task, cfg)
    out = train(task, replace(cfg, path="wrapper"))
    assert isinstance(out.wrapped, SubspaceModel) and len(out.wrapped.layers) == 7 * 2   # attn q,k,v,o + mlp x3
    assert {layer.step for layer in out.wrapped.layers.values()} == {8}
    assert type(out.model) is type(ref.model)                        # the plain LLaMA, with the merged weights
    assert not any(isinstance(m, SubspaceLinear) for m in out.model.modules())
    merged = out.wrapped.merged_state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in out.model.state_dict().items())
    assert max_diff(ref.model.state_dict(), build_model(task.model_cfg, 0).state_dict()) > 0.01    # it trained
    assert max_diff(out.model.state_dict(), ref.model.state_dict()) < 2e-6                         # measured 1.2e-7
    for a, b in zip(ref.history, out.history, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"] and a["tokens"] == b["tokens"]  # same batches
        for key in ("train_loss", "val_loss"):
            assert b.get(key, 0.0) == pytest.approx(a.get(key, 0.0), rel=1e-5), (a["step"], key)


@pytest.mark.parametrize("method, optimizer", [("golore@75", "adamw"), ("lb-galore", "sgd")])
def test_wrapper_resume_is_bit_identical(task, tmp_path, method, optimizer):
    """Stop at step 3, right before a refresh; the checkpoint's "model" is the merged plain state dict."""
    cfg = small(method=method, optimizer=optimizer, path="wrapper", grad_clip=1.0)
    straight = train(task, replace(cfg, out_dir=str(tmp_path / "a")))
    train(task, replace(cfg, out_dir=str(tmp_path / "b"), stop_at=3))
    resumed = train(task, replace(cfg, out_dir=str(tmp_path / "b"), resume=True))
    a, b = straight.wrapped.state_dict(), resumed.wrapped.state_dict()
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]) if k.endswith("_extra_state") else torch.equal(a[k], b[k]) for k in a)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("step", "examples", "tokens", "lr", "train_loss", "grad_norm", "val_loss")
    rows = [[{k: r.get(k) for k in keep} for r in run.history] for run in (straight, resumed)]
    assert rows[0] == rows[1]
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    plain = build_model(task.model_cfg, 0)
    plain.load_state_dict(state["model"])                              # strict: the unwrapped architecture's keys
    assert all(torch.equal(v, b[k]) for k, v in plain.state_dict().items())
    with pytest.raises(ValueError, match=r"another configuration \(path: 'wrapper' -> 'optimizer'\)"):
        train(task, replace(cfg, out_dir=str(tmp_path / "b"), resume=True, path="optimizer"))


def test_cli_path_flag(corpus_root, tmp_path, capsys):
    common = ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress",
              "--seq-len", "32", "--eval-windows", "4", "--steps", "4", "--warmup-steps", "1", "--rank", "4",
              "--update-proj-gap", "2", "--method", "golore@50"]
    assert main(common + ["--path", "wrapper", "--out", str(tmp_path / "w")]) == 0
    wrapper_final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--out", str(tmp_path / "o")]) == 0                   # default: the optimizer path
    optimizer_final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    state = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)
    assert state["config"]["path"] == "wrapper" and "wrapper" in state
    assert "wrapper" not in torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert wrapper_final["step"] == optimizer_final["step"] == 4
    # clip 1 barely bites over 4 tiny steps (measured difference 5e-7); it would make the paths differ otherwise
    assert wrapper_final["val_loss"] == pytest.approx(optimizer_final["val_loss"], abs=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--path", "lora"], "invalid choice: 'lora'"),
    (["--path", "wrapper"], "Invalid path: 'wrapper' with method 'full'"),
    (["--path", "wrapper", "--method", "galore", "--optimizer", "sgd", "--weight-decay", "0.1"],
     "Invalid weight_decay: 0.1 with path 'wrapper' and optimizer 'sgd'"),
])
def test_bad_path_combinations_are_named(argv, message, capsys, corpus_root):
    with pytest.raises(SystemExit):
        main(argv + ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress"])
    assert message in capsys.readouterr().err


def test_wrapper_path_needs_linear_subspace_weights(task):
    """A task whose subspace group holds a non-Linear matrix (here the embedding) cannot take the wrapper path."""
    class EmbeddingInSubspace(LMTask):
        def param_groups(self, model, **subspace):
            groups = super().param_groups(model, **subspace)
            groups[0]["params"].append(model.embed.weight)
            groups[1]["params"] = [p for p in groups[1]["params"] if p is not model.embed.weight]
            return groups

    odd = EmbeddingInSubspace.__new__(EmbeddingInSubspace)
    odd.__dict__.update(task.__dict__)
    with pytest.raises(ValueError, match=r"subspace parameter 'embed.weight' is not the weight of one"):
        train(odd, small(method="galore", path="wrapper"))
