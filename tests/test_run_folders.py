"""Run folders that cannot lose or mix history, resumes that cannot change the result, divergence as an error.

Kills are simulated deterministically: a writer made to fail at a chosen point (the serialisation of a metrics
row, ``torch.save`` raising ``OSError(ENOSPC)`` half-way) stands for the process dying there.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from golore_lab.lm.finetune import TaskConfig
from golore_lab.lm.pretrain import LMTask, main, recipe
from golore_lab.lm.train import (RESUME_MAY_CHANGE, TrainConfig, RunError, identity_changes, run_identity,
                                 train)
from lm_helpers import VOCAB


def small(**overrides) -> TrainConfig:
    return recipe("tiny", **{"steps": 12, "warmup_steps": 2, "rank": 4, "update_proj_gap": 4, "eval_every": 6,
                             "log_every": 3, "method": "golore@50", "progress": False, **overrides})


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


KEEP = ("step", "examples", "tokens", "lr", "train_loss", "val_loss")


def same_history(a: list[dict], b: list[dict]) -> bool:
    return [{k: r.get(k) for k in KEEP} for r in a] == [{k: r.get(k) for k in KEEP} for r in b]


@pytest.fixture(scope="module")
def straight(task, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    return train(task, replace(small(), out_dir=str(tmp_path_factory.mktemp("straight"))))


def stopped(task, folder, at: int = 6) -> TrainConfig:
    cfg = replace(small(), out_dir=str(folder))
    train(task, replace(cfg, stop_at=at))
    return cfg


# -------------------------------------------------------------------------------------------- metrics files
def test_a_resume_killed_while_rewriting_the_metrics_loses_nothing(task, tmp_path, straight, monkeypatch):
    """The resume rewrites the metrics: dying at its third row must leave the old files whole, not truncated."""
    cfg = stopped(task, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "metrics.csv")}
    real, count = json.dumps, [0]

    def dying_dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and "step" in obj:
            count[0] += 1
            if count[0] == 3:
                raise KeyboardInterrupt("killed while writing a metrics row")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dying_dumps)
    with pytest.raises(KeyboardInterrupt):
        train(task, replace(cfg, resume=True))
    monkeypatch.setattr(json, "dumps", real)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before   # the old files, whole
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = train(task, replace(cfg, resume=True))
    assert same_history(resumed.history, straight.history)
    assert same_history(rows_of(tmp_path / "metrics.jsonl"), straight.history)


def test_torn_last_lines_and_rows_after_the_checkpoint_are_dropped(task, tmp_path, straight, capsys):
    cfg = stopped(task, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:        # logged after the checkpoint, then a torn row
        f.write(json.dumps({"step": 9, "train_loss": 1.0}) + "\n" + '{"step": 12, "train_lo')
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("12,96,3072,0.00")
    resumed = train(task, replace(cfg, resume=True))
    err = capsys.readouterr().err
    assert "dropped its torn last line" in err and "dropped 1 row(s) logged after the checkpoint's step 6" in err
    assert same_history(resumed.history, straight.history)
    assert same_history(rows_of(tmp_path / "metrics.jsonl"), straight.history)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == len(straight.history) + 1 and all(line.count(",") == csv_lines[0].count(",")
                                                               for line in csv_lines)


def test_a_damaged_line_before_the_last_is_named(task, tmp_path):
    cfg = stopped(task, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"metrics.jsonl: line 2 is not a metrics row \(not JSON"):
        train(task, replace(cfg, resume=True))


# ----------------------------------------------------------------------------------------- one run per folder
def test_a_new_run_into_a_folder_that_holds_one_is_refused(task, tmp_path, capsys, corpus_root):
    cfg = stopped(task, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    with pytest.raises(RunError, match="already holds a run .*--resume.*--overwrite"):
        train(task, replace(cfg, method="galore"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"} == before
    argv = ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress",
            "--steps", "2", "--warmup-steps", "1", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_overwrite_moves_the_old_run_aside(task, tmp_path, capsys):
    folder = tmp_path / "run"
    cfg = stopped(task, folder)
    old = {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "metrics.csv")}
    result = train(task, replace(cfg, method="galore", stop_at=None, overwrite=True))
    err = capsys.readouterr().err
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert f"moved the run that was in {folder} to {aside}" in err
    assert {name: (aside / name).read_bytes() for name in old} == old
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["config"]["method"] == "galore"
    assert same_history(rows_of(folder / "metrics.jsonl"), result.history)


def test_a_second_concurrent_run_is_refused(task, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as held:        # another process's lock: a separate open file description
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match="is in use by another run"):
            train(task, replace(small(steps=2, warmup_steps=1), out_dir=str(tmp_path)))
        assert not (tmp_path / "metrics.jsonl").exists()
    train(task, replace(small(steps=2, warmup_steps=1), out_dir=str(tmp_path)))   # free again


def test_stale_temporaries_are_removed_at_start(task, tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".checkpoint.pt.4242.tmp", tmp_path / ".metrics.jsonl.17.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (tmp_path / "notes.tmp").write_text("the user's")
    train(task, replace(small(steps=2, warmup_steps=1), out_dir=str(tmp_path)))
    assert not any(path.exists() for path in stale) and (tmp_path / "notes.tmp").exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_checkpoint(task, tmp_path, monkeypatch, capsys, corpus_root):
    real, calls = torch.save, [0]

    def full_disk(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real(obj, buffer)
        data = buffer.getvalue()[:1000]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(data)
        else:
            f.write(data)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress",
            "--steps", "6", "--warmup-steps", "1", "--seq-len", "32", "--eval-windows", "8", "--checkpoint-every", "2",
            "--method", "galore", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no space left while writing the checkpoint; the previous checkpoint at step 2 is intact" in err
    assert not list(tmp_path.glob(".*.tmp"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch, "save", real)
    assert main(argv + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6


# --------------------------------------------------------------------------------------------- divergence
class Diverging(LMTask):
    """The tiny task, whose loss turns NaN from stream position ``at`` on (or whose evaluation does)."""

    def __init__(self, base: LMTask, at: int | None = None, eval_nan: bool = False):
        self.__dict__.update(base.__dict__)
        self.at, self.eval_nan = at, eval_nan

    def batch(self, start, count, seed):
        return super().batch(start, count, seed), start

    def loss(self, model, batch):
        tokens, start = batch
        loss = super().loss(model, tokens)
        return loss * math.nan if self.at is not None and start >= self.at else loss

    def count_tokens(self, batch):
        return super().count_tokens(batch[0])

    def evaluate(self, model):
        out = super().evaluate(model)
        return {**out, "val_loss": math.nan} if self.eval_nan else out


@pytest.mark.parametrize("method", ["full", "galore"])
def test_a_non_finite_training_loss_stops_the_run_and_keeps_the_last_checkpoint(task, tmp_path, method):
    cfg = replace(small(method=method, checkpoint_every=2), out_dir=str(tmp_path))
    with pytest.raises(RunError, match=r"training loss is nan at step 6: the run diverged and is stopped; the last "
                                       r"checkpoint, .*checkpoint.pt at step 4, is kept"):
        train(Diverging(task, at=5 * cfg.batch_size), cfg)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    assert max(r["step"] for r in rows_of(tmp_path / "metrics.jsonl")) <= 5


def test_a_non_finite_validation_loss_stops_the_run(task):
    with pytest.raises(RunError, match="validation val_loss is nan at step 0: the run diverged"):
        train(Diverging(task, eval_nan=True), small())


def test_sgd_at_lr_1e4_stops_cleanly(corpus_root, capsys):
    """Full SGD at lr 1e4: a finite loss is reported (perplexity may overflow to inf), a non-finite one stops the run;
    never an OverflowError from exp() in the evaluation."""
    argv = ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress",
            "--optimizer", "sgd", "--lr", "1e4", "--steps", "20", "--warmup-steps", "1", "--eval-every", "1",
            "--seq-len", "32", "--eval-windows", "8"]
    code = main(argv)
    captured = capsys.readouterr()
    if code == 0:      # the loss stayed finite: perplexity may be inf, but the numbers are reported
        assert "val_loss" in captured.out
    else:
        assert code == 1 and "the run diverged and is stopped" in captured.err


def test_perplexity_overflows_to_inf(task):
    class Huge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            logits = torch.zeros(*idx.shape, task.model_cfg.vocab_size)
            logits[..., 0] = 1e4          # every other token has probability ~exp(-1e4)
            return logits

    out = task.evaluate(Huge())
    assert out["val_loss"] > 1000 and out["val_ppl"] == math.inf


# ------------------------------------------------------------------------------------ resume identity
def changed_value(name: str, value, cfg: TrainConfig):
    """A different valid value for a TrainConfig field: generic by type, so a new field is covered by default."""
    special = {"method": "galore", "optimizer": "sgd", "path": "wrapper", "schedule": "linear",
               "micro_batch_size": cfg.batch_size // 2, "betas": (0.8, 0.999), "proj_type": "reverse_std",
               "state_on_refresh": "reset", "warmup_steps": cfg.warmup_steps + 1, "batch_size": 2 * cfg.batch_size,
               "min_lr_ratio": 0.5}
    if name in special:
        return special[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.1
    raise AssertionError(f"no changed value for field {name!r} = {value!r}: add one to changed_value")


RESULT_FIELDS = [f.name for f in fields(TrainConfig) if f.name not in RESUME_MAY_CHANGE]


def test_the_allow_list_is_the_documented_one():
    """Widening it drops fields from the parametrised test below: it has to be a deliberate change, made here."""
    assert RESUME_MAY_CHANGE == {"resume", "overwrite", "stop_at", "out_dir", "checkpoint_every", "log_every",
                                 "progress", "device"}


@pytest.fixture(scope="module")
def stopped_run(task, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stopped")
    # no clipping, so that flipping ``layerwise`` alone is a valid configuration (it refuses a global clip)
    cfg = replace(small(steps=4, warmup_steps=1, weight_decay=0.0, grad_clip=0.0), out_dir=str(folder))
    train(task, replace(cfg, stop_at=2))
    return cfg


@pytest.mark.parametrize("name", RESULT_FIELDS)
def test_every_result_changing_option_is_refused_on_resume(task, stopped_run, name):
    new = changed_value(name, getattr(stopped_run, name), stopped_run)
    cfg = replace(stopped_run, resume=True, **{name: new})
    with pytest.raises(ValueError, match=rf"another configuration \({name}: "):
        train(task, cfg)


def test_the_options_allowed_to_change_on_resume_do_not_change_the_result(task, tmp_path, straight):
    cfg = stopped(task, tmp_path)
    resumed = train(task, replace(cfg, resume=True, log_every=6, checkpoint_every=5, progress=False,
                                  device="cpu"))
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))


@pytest.mark.parametrize("option, value", [("seq_len", 16), ("eval_windows", 6), ("eval_batch", 4)])
def test_task_options_are_refused_on_resume(task, stopped_run, option, value):
    other = LMTask.__new__(LMTask)
    other.__dict__.update(task.__dict__)
    kwargs = {"seq_len": task.seq_len, "eval_windows": task.eval_windows, "eval_batch": task.eval_batch,
              option: value}
    other.__init__(_corpus_of(task), task.model_cfg, **kwargs)
    with pytest.raises(ValueError, match=rf"another configuration \(task.{option}: "):
        train(other, replace(stopped_run, resume=True))


def _corpus_of(task):
    from golore_lab.lm.data import Corpus

    return Corpus(train=np.asarray(task.train_tokens), val=np.asarray(task.val_tokens), vocab_size=task.model_cfg.vocab_size,
                  eot_id=0, path=None, manifest={"files": task.corpus_files})


def _resume_is_refused(program, base: list[str], stop_at: str, argv: list[str], name: str, capsys) -> None:
    """Run ``program`` to ``stop_at``, then resume with ``argv`` changed: refused, naming the field ``name``."""
    assert program(base + ["--stop-at", stop_at]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        program(base + ["--resume"] + argv)
    err = capsys.readouterr().err
    assert "was written with another configuration (" in err and name in err


@pytest.mark.parametrize("argv, name", [
    (["--seq-len", "16"], "task.seq_len: 32 -> 16"), (["--eval-windows", "6"], "task.eval_windows: 8 -> 6"),
    (["--vocab-size", str(VOCAB - 20)], "task.corpus.train.npy: "), (["--model", "cpu"], "task.model.dim: 32 -> 128"),
    (["--lr", "0.01"], "lr: 0.003 -> 0.01"), (["--method", "golore@60"], "method: 'full' -> 'golore@60'"),
])
def test_pretrain_cli_refuses_result_changing_options_on_resume(corpus_root, tmp_path, capsys, argv, name):
    from lm_helpers import build_fixture_corpus

    if "--vocab-size" in argv:
        build_fixture_corpus(corpus_root, VOCAB - 20)
    base = ["--cache", str(corpus_root), "--model", "tiny", "--no-progress", "--steps", "4", "--warmup-steps", "1",
            "--seq-len", "32", "--eval-windows", "8", "--vocab-size", str(VOCAB), "--out", str(tmp_path)]
    _resume_is_refused(main, base, "2", argv, name, capsys)


def test_every_pretrain_option_is_classified():
    """A CLI option either changes the result (a TrainConfig field or a task option, both in the run identity) or
    is listed here as one that cannot: a new option is refused on resume by default."""
    import argparse

    from golore_lab.lm import pretrain

    seen = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.update(vars(real(self, args, namespace)))
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            pretrain.main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    task_options = {"model", "seq_len", "eval_windows", "vocab_size", "model_config",
                    # the corpus: its files' sha256 are task options (and --data's names, when given)
                    "data", "tokenizer", "text_field", "data_config", "val_data", "val_split", "max_tokens",
                    "max_documents", "max_val_documents",
                    "recipe"}  # resolves to TrainConfig fields and the options above
    not_results = {"cache", "threads", "max_hours", "plan_only", "prepare_only"}
    assert set(seen) == {f.name for f in fields(TrainConfig)} | task_options | not_results


@pytest.mark.parametrize("name", [f.name for f in fields(TaskConfig)])
def test_every_finetune_task_field_is_in_the_run_identity(name):
    """Fine-tuning's task options (--split-seed, --max-length, the subsample sizes...) are all compared."""
    from golore_lab.lm.finetune import ClassificationTask

    def identity(config: TaskConfig):
        task = ClassificationTask.__new__(ClassificationTask)
        task.config, task.max_length = config, config.max_length or 64
        return run_identity(TrainConfig(), task, 16)

    base = TaskConfig()
    value = getattr(base, name)
    new = {"task": "bbc-news", "max_length": 40}[name] if isinstance(value, str) or name == "max_length" else \
        (7 if value is None else value + 1)
    changes = identity_changes(identity(base)["task"], identity(replace(base, **{name: new}))["task"])
    assert changes and changes[0].startswith(f"{name}: ")


@pytest.mark.parametrize("argv, name", [(["--split-seed", "1"], "task.split_seed: 0 -> 1"),
                                        (["--max-length", "24"], "task.max_length: 32 -> 24")])
def test_finetune_cli_refuses_result_changing_options_on_resume(tmp_path, capsys, argv, name):
    from golore_lab.lm.finetune import main as finetune

    base = ["--preset", "fast", "--task", "bbc-news", "--method", "galore", "--no-progress", "--steps", "2",
            "--train-examples", "16", "--out", str(tmp_path)]
    _resume_is_refused(finetune, base, "1", argv, name, capsys)
