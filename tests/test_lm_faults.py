"""Every fault of a run answered by name: divergence, damaged files, unwritable folders, full disks, signals, bad
values. Each message says what is kept; the programs exit 1 (the run stopped), 2 (bad option) or 128 + signal."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import time
from dataclasses import replace

import pytest
import torch

from golore_lab.lm import metrics as metrics_module
from golore_lab.lm import runfolder
from golore_lab.lm.memory import HEADROOM, choose_micro_batch, divisors
from golore_lab.lm.pretrain import LMTask, main, recipe
from golore_lab.lm.train import DIVERGENCE_FACTOR, RunError, RunInterrupted, TrainConfig, train
from golore_lab.lm.trainer import divergence
from lm_helpers import VOCAB


def small(**overrides) -> TrainConfig:
    return recipe("tiny", **{"steps": 12, "warmup_steps": 2, "rank": 4, "update_proj_gap": 4, "eval_every": 6,
                             "log_every": 3, "method": "galore", "progress": False, **overrides})


def strict_rows(path) -> list[dict]:
    """The JSON lines of ``path``, refusing NaN / Infinity (which JSON does not have)."""
    def refuse(constant):
        raise AssertionError(f"{path.name} holds {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def cli(corpus_root, out, *extra) -> list[str]:
    return ["--cache", str(corpus_root), "--vocab-size", str(VOCAB), "--model", "tiny", "--no-progress",
            "--seq-len", "32", "--eval-windows", "8", *(["--out", str(out)] if out else []), *extra]


def same_history(a, b) -> bool:
    keep = ("step", "examples", "tokens", "lr", "train_loss", "val_loss")
    return [{k: r.get(k) for k in keep} for r in a] == [{k: r.get(k) for k in keep} for r in b]


@pytest.fixture(scope="module")
def straight(task, tmp_path_factory):
    return train(task, replace(small(), out_dir=str(tmp_path_factory.mktemp("straight"))))


def stopped(task, folder, at: int = 6) -> TrainConfig:
    cfg = replace(small(), out_dir=str(folder))
    train(task, replace(cfg, stop_at=at))
    return cfg


def snapshot(folder) -> dict:
    return {p.name: (p.read_bytes() if p.is_file() else "dir") for p in folder.iterdir() if p.name != ".lock"}


# --------------------------------------------------------------------------------------------- divergence
def test_divergence_is_a_multiple_of_the_start_or_not_finite():
    assert divergence("train_loss", DIVERGENCE_FACTOR * 5.0, 5.0) is None
    assert "more than 10 times its starting value 5" in divergence("train_loss", DIVERGENCE_FACTOR * 5.0 + 1e-6, 5.0)
    assert divergence("val_ppl", math.inf, 300.0) == "is inf"
    assert divergence("val_accuracy", 0.99, 0.1) is None          # only losses are compared with their start
    assert divergence("val_loss", math.nan, None) == "is nan"


def test_sgd_at_lr_1e4_exits_1_naming_the_step(corpus_root, tmp_path, capsys):
    """The issue's run: loss 8 -> 178 267 at lr 1e4. It stops at the first step whose loss is past 10x the
    start, before any checkpoint of an exploded model; the metrics hold no Infinity."""
    code = main(cli(corpus_root, tmp_path, "--method", "full", "--optimizer", "sgd", "--lr", "10000", "--steps", "10",
                    "--checkpoint-every", "2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "training loss is" in err and "more than 10 times its starting value" in err and "at step 2:" in err
    assert "the run diverged and is stopped; no checkpoint was written" in err
    assert not (tmp_path / "checkpoint.pt").exists()
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [0]


class ExplodingEvaluation(LMTask):
    """The tiny task whose ``n``-th evaluation reports a loss 100 times the true one (an exploded model)."""

    def __init__(self, base: LMTask, n: int):
        self.__dict__.update(base.__dict__)
        self.n, self.calls = n, 0

    def evaluate(self, model):
        out = super().evaluate(model)
        self.calls += 1
        return {**out, "val_loss": 100 * out["val_loss"]} if self.calls == self.n else out


def test_an_exploded_model_never_replaces_the_last_good_checkpoint(task, tmp_path):
    """Every checkpoint is written only after its model is evaluated: evaluations at steps 0, 2 (checkpoint),
    4 (checkpoint: exploded) -- the checkpoint of step 2 stays."""
    cfg = replace(small(checkpoint_every=2), out_dir=str(tmp_path))
    with pytest.raises(RunError, match=r"validation val_loss is .*more than 10 times its starting value .* at step 4: "
                                       r"the run diverged and is stopped; the last checkpoint, .*checkpoint.pt at "
                                       r"step 2, is kept"):
        train(ExplodingEvaluation(task, n=3), cfg)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_metrics_never_hold_nan_or_infinity(task, tmp_path):
    """Without clipping there is no gradient norm: it is null, not NaN, in the JSON and empty in the CSV."""
    train(task, replace(small(grad_clip=0.0, steps=3, warmup_steps=1, log_every=1), out_dir=str(tmp_path)))
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["grad_norm"] for r in rows[1:]] == [None, None, None]
    assert "nan" not in (tmp_path / "metrics.csv").read_text().lower()


def test_non_finite_numbers_are_written_as_null():
    from golore_lab.lm.metrics import MetricsLog, json_row

    assert json_row({"step": 1, "val_ppl": math.inf, "grad_norm": math.nan, "lr": 0.5}) == \
        '{"step": 1, "val_ppl": null, "grad_norm": null, "lr": 0.5}'
    assert MetricsLog(None, ["val_ppl"])._csv_lines([{"step": 1, "val_ppl": math.inf}]) == "1,,,,,,,,\r\n"


# ------------------------------------------------------------------------------------- damaged checkpoints
def _random_bytes(path):
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path):
    path.write_bytes(b"")


def _directory(path):
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


def _no_model(path):
    state = torch.load(path, weights_only=True)
    del state["model"]
    torch.save(state, path)


@pytest.mark.parametrize("damage, defect", [
    (_random_bytes, " is not a readable checkpoint (UnpicklingError"),
    (_truncated, " is not a readable checkpoint ("),
    (_empty, " is not a readable checkpoint (EOFError: the file is empty)"),
    (_directory, ": a directory where the run keeps a file"),
    (_no_model, " is not a checkpoint of this program (no model)"),
])
def test_a_damaged_checkpoint_is_named_and_the_folder_kept(task, tmp_path, damage, defect, corpus_root, capsys):
    cfg = stopped(task, tmp_path)
    damage(tmp_path / "checkpoint.pt")
    before = snapshot(tmp_path)
    with pytest.raises(RunError) as error:
        train(task, replace(cfg, resume=True))
    assert f"{tmp_path / 'checkpoint.pt'}{defect}" in str(error.value)
    assert re.search(r"nothing (in .* )?was changed", str(error.value))
    assert snapshot(tmp_path) == before
    if damage is _empty:   # the program: exit 1, the same message
        code = main(cli(corpus_root, tmp_path, "--method", "galore", "--resume"))
        assert code == 1 and defect in capsys.readouterr().err


@pytest.mark.parametrize("line, problem", [("{}", "no integer step >= 0"), ("42", "a JSON int, not an object"),
                                           ('{"step": "3"}', "no integer step >= 0")])
def test_a_metrics_line_that_is_json_but_not_a_row_is_named(task, tmp_path, line, problem):
    cfg = stopped(task, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match=rf"metrics.jsonl: line 2 is not a metrics row \({problem}"):
        train(task, replace(cfg, resume=True))
    assert snapshot(tmp_path) == before


def test_duplicated_and_reordered_rows_are_repaired_and_reported(task, tmp_path, straight, capsys):
    cfg = stopped(task, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines = [lines[0], lines[2], lines[1], lines[1], *lines[3:]]     # step 3 twice, after step 6
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = train(task, replace(cfg, resume=True))
    err = capsys.readouterr().err
    assert "repaired: dropped 1 duplicated row(s)" in err and "repaired: rows put back in step order" in err
    assert same_history(resumed.history, straight.history)
    assert same_history(strict_rows(tmp_path / "metrics.jsonl"), straight.history)


# ------------------------------------------------------------------------------------- unwritable folders
@pytest.mark.parametrize("code, said", [(errno.EACCES, "not writable (permission denied)"),
                                        (errno.EROFS, "on a read-only file system")])
def test_a_read_only_folder_is_named(task, tmp_path, monkeypatch, code, said):
    """(The tests run as root, whom permissions do not stop: the refusal is simulated where the lock is opened.)"""
    real = os.open

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runfolder.os, "open", refusing)
    with pytest.raises(RunError, match=rf"cannot write in {tmp_path}: {re.escape(said)}; nothing in it was changed"):
        train(task, replace(small(steps=2, warmup_steps=1), out_dir=str(tmp_path)))


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "metrics.csv", "checkpoint.pt"])
def test_a_run_file_that_is_a_directory_is_named(task, tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(RunError, match=rf"{re.escape(str(tmp_path / name))}.*is a directory|"
                                       rf"{re.escape(str(tmp_path / name))}: a directory where the run keeps a file"):
        train(task, replace(small(steps=2, warmup_steps=1), out_dir=str(tmp_path)))
    assert (tmp_path / name).is_dir() and not (tmp_path / "checkpoint.pt").is_file()


def test_out_naming_a_file_is_a_bad_option(corpus_root, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(cli(corpus_root, tmp_path / "file", "--steps", "2", "--warmup-steps", "1"))
    assert exit_.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_disk_full_during_a_metrics_append_leaves_whole_rows(task, tmp_path, straight, monkeypatch):
    """The CSV append tears (half a line, then ENOSPC): both files are cut back to the row before, the run
    stops naming the step and the checkpoint, and a resume reproduces the straight run."""
    cfg = replace(small(checkpoint_every=3), out_dir=str(tmp_path))
    real, calls = metrics_module.append_bytes, [0]

    def filling(path, data, durable=False):
        if path.name == "metrics.csv":
            calls[0] += 1
            if calls[0] == 4:      # rows of steps 0, 3, 6, then 9
                real(path, data[: len(data) // 2], durable)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, durable)

    monkeypatch.setattr(metrics_module, "append_bytes", filling)
    with pytest.raises(RunError, match=r"no space left while appending the metrics row of step 9: the row is not in "
                                       r"metrics.jsonl or metrics.csv \(both end at the row before\); the last "
                                       r"checkpoint, .* at step 6, is kept"):
        train(task, cfg)
    monkeypatch.setattr(metrics_module, "append_bytes", real)
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [0, 3, 6]
    assert (tmp_path / "metrics.csv").read_text().endswith("\n")
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4
    resumed = train(task, replace(cfg, resume=True))
    assert same_history(resumed.history, straight.history)


def test_metric_appends_are_fsynced(task, tmp_path, monkeypatch):
    from golore_lab import fileio

    real, synced = fileio.os.fsync, []

    def counting(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", counting)
    result = train(task, replace(small(steps=3, warmup_steps=1, log_every=1), out_dir=str(tmp_path)))
    for name in ("metrics.jsonl", "metrics.csv"):
        assert sum(path.endswith(name) for path in synced) >= len(result.history) - 1, name


# ------------------------------------------------------------------------------------------ signals
class Signalling(LMTask):
    """The tiny task that sends itself ``signum`` while computing the loss at stream position ``at``."""

    def __init__(self, base: LMTask, signum: int, at: int):
        self.__dict__.update(base.__dict__)
        self.signum, self.at = signum, at

    def loss(self, model, batch):
        if self.at is not None and getattr(self, "_position", None) == self.at:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.01)   # the handler runs in this thread, at the next bytecode boundary
        return super().loss(model, batch)

    def batch(self, start, count, seed):
        self._position = start
        return super().batch(start, count, seed)


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_stops_at_a_safe_point_and_keeps_the_step(task, tmp_path, straight, signum, name, capsys):
    cfg = replace(small(), out_dir=str(tmp_path))
    with pytest.raises(RunInterrupted, match=rf"stopped by {name} after step 5 of 12: the last checkpoint, "
                                             rf".*checkpoint.pt at step 5, is kept; continue it with --resume") as err:
        train(Signalling(task, signum, at=4 * cfg.batch_size), cfg)    # during step 5
    assert err.value.signum == signum
    assert f"received {name}: stopping after the current step" in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5
    resumed = train(task, replace(cfg, resume=True))
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))
    assert signal.getsignal(signum) is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_program_exits_128_plus_the_signal(corpus_root, tmp_path, monkeypatch, capsys, task):
    from golore_lab.lm import pretrain

    monkeypatch.setattr(pretrain, "LMTask", lambda *a, **k: Signalling(LMTask(*a, **k), signal.SIGINT, at=8))
    code = main(cli(corpus_root, tmp_path, "--steps", "4", "--warmup-steps", "1"))
    assert code == 130 and "stopped by SIGINT after step 2 of 4" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_is_resumable(task, tmp_path, straight, capsys):
    """Killed before any checkpoint (here: SIGINT before the first step ends is honoured after it; a hard kill
    leaves the same folder): a plain rerun names the two commands that work, --resume starts from step 0."""
    cfg = replace(small(), out_dir=str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 5.0}) + "\n")
    (tmp_path / "metrics.csv").write_text("step\n0\n")
    with pytest.raises(RunError, match="stopped before its first checkpoint .*--resume starts it again from step 0, "
                                       "--overwrite moves them aside"):
        train(task, cfg)
    resumed = train(task, replace(cfg, resume=True))
    assert "holds no checkpoint yet (the run was stopped before its first one): starting it from step 0" in \
        capsys.readouterr().err
    assert same_history(resumed.history, straight.history)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train(task, replace(cfg, out_dir=str(tmp_path / "empty"), resume=True))


# ------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("argv, message", [
    (["--threads", "1000000000000"], "argument --threads: 1000000000000 is more than 1024"),
    (["--threads", "0"], "argument --threads: 0 is not >= 1"),
    (["--seq-len", "0"], "argument --seq-len: 0 is not >= 1"),
    (["--batch-size", "1000000000000"], "Invalid batch_size: 1000000000000 (must be <= 1e+06)"),
    (["--steps", "10000000000"], "Invalid steps: 10000000000 (must be <= 1e+09)"),
    (["--eps", "0"], "Invalid eps: 0.0 (must be > 0 with adamw)"),
    (["--optimizer", "sgd", "--momentum", "1e30"], "Invalid momentum: 1e+30 (must be in [0, 1])"),
    (["--weight-decay", "1e30"], "Invalid weight_decay: 1e+30 (must be < 1 / lr"),
])
def test_bad_pretrain_values_are_named(corpus_root, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(cli(corpus_root, None, *argv))
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "Invalid batch_size: 0"),
    (["--epochs", "inf"], "argument --epochs: 'inf' is not a finite number"),
    (["--epochs", "1e30"], "Invalid epochs: 1e+30 (that is"),
    (["--val-examples", "0"], "argument --val-examples: 0 is not >= 1"),
    (["--max-length", "0"], "argument --max-length: 0 is not >= 1"),
    (["--train-examples", "-1"], "argument --train-examples: -1 is not >= 1"),
    (["--train-examples", "0"], "argument --train-examples: 0 is not >= 1"),
    (["--threads", "1000000000000"], "argument --threads: 1000000000000 is more than 1024"),
])
def test_bad_finetune_values_are_named(argv, message, capsys):
    from golore_lab.lm.finetune import main as finetune

    with pytest.raises(SystemExit) as exit_:
        finetune(["--preset", "fast", "--task", "bbc-news", "--no-progress", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_micro_batch_choice_does_not_walk_every_candidate():
    assert divisors(12) == [12, 6, 4, 3, 2, 1] and len(divisors(10**12)) == 169
    asked = []

    def need(m):
        asked.append(m)
        from golore_lab.lm.memory import StepMemory
        return StepMemory.of((0, 0, 0), m * 1000)

    start = time.perf_counter()
    micro, note = choose_micro_batch(10**12, need, available=10**9, given=None)
    assert micro * 1000 <= HEADROOM * 10**9 and 10**12 % micro == 0 and "micro-batches of" in note
    assert len(asked) < 200 and time.perf_counter() - start < 5

