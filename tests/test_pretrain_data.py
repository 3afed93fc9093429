"""``pretrain`` on the user's data: a C4-format shard and a Hugging Face tokenizer the tests build, a LLaMA config file,
and the paper's recipes run for a few steps with local inputs (and planned, not started, when they cannot run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from golore_lab.lm.corpus import load_token_corpus
from golore_lab.lm.pretrain import LMTask, main
from golore_lab.lm.recipes import CANNOT_RUN, PRETRAIN_RECIPES

pytest.importorskip("transformers")
from test_corpus import documents, expected_ids, word_tokenizer, write_c4_shard  # noqa: E402

TINY = ["--model", "tiny", "--seq-len", "16", "--eval-windows", "4", "--batch-size", "4", "--rank", "4",
        "--update-proj-gap", "2", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "3", "--no-progress"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two C4-format training shards, one validation shard, and a word-level transformers tokenizer."""
    root = tmp_path_factory.mktemp("c4")
    spec, vocab = word_tokenizer(root / "tok")
    docs = {"a": documents(200, 1), "b": documents(200, 3), "val": documents(40, 2)}
    paths = {}
    for name, texts in docs.items():
        paths[name] = root / f"c4-{name}.00000-of-01024.json.gz"
        write_c4_shard(paths[name], texts)
    return {"tok": spec, "vocab": vocab, "docs": docs, "paths": paths, "cache": root / "cache"}


def data_argv(shards, train="a") -> list[str]:
    return ["--data", str(shards["paths"][train]), "--val-data", str(shards["paths"]["val"]), "--tokenizer",
            shards["tok"], "--cache", str(shards["cache"])]


def read_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_c4_shard_and_tokenizer_end_to_end_with_resume(shards, tmp_path, capsys):
    argv = data_argv(shards) + TINY + ["--steps", "6", "--method", "golore@50"]
    assert main(argv + ["--out", str(tmp_path / "straight")]) == 0
    # the corpus: exactly the shard's words + one end-of-sequence id per document
    corpus = load_token_corpus(next((shards["cache"] / "corpora").glob("c4-a*")))
    np.testing.assert_array_equal(corpus.train, expected_ids(shards["docs"]["a"], shards["vocab"]))
    np.testing.assert_array_equal(corpus.val, expected_ids(shards["docs"]["val"], shards["vocab"]))
    rows = read_rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["tokens"] for r in rows] == [4 * 16 * s for s in range(7)]   # batch 4 x 16 tokens per step
    assert main(argv + ["--out", str(tmp_path / "resumed"), "--stop-at", "3"]) == 0
    assert main(argv + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=False) for f in ("straight", "resumed"))
    assert a["model"]["embed.weight"].shape[0] == len(shards["vocab"])   # the corpus' vocabulary
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    keep = ("step", "tokens", "lr", "train_loss", "val_loss")
    assert [{k: r.get(k) for k in keep} for r in read_rows(tmp_path / "straight")] == \
        [{k: r.get(k) for k in keep} for r in read_rows(tmp_path / "resumed")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(data_argv(shards, "b") + TINY + ["--steps", "6", "--method", "golore@50",
                                               "--out", str(tmp_path / "resumed"), "--resume"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "task.data.data" in err and "c4-b" in err


def test_batches_read_the_memory_map_lazily(shards):
    from golore_lab.lm.model import LlamaConfig

    corpus = load_token_corpus(next((shards["cache"] / "corpora").glob("c4-a*")))
    task = LMTask(corpus, LlamaConfig.preset("tiny"), seq_len=16, eval_windows=4)
    assert isinstance(task.train_tokens, np.memmap) and isinstance(task.val_tokens, np.memmap)
    ids = expected_ids(shards["docs"]["a"], shards["vocab"])
    batch = task.batch(5, 3, seed=0)
    assert batch.dtype == torch.int64 and batch.shape == (3, 17)
    for row in batch:  # each row is a window tokens[k T : k T + T + 1] of the corpus
        k = int(np.flatnonzero([np.array_equal(ids[j * 16:j * 16 + 17], row.numpy())
                                for j in range((len(ids) - 1) // 16)])[0])
        assert np.array_equal(ids[k * 16:k * 16 + 17], row.numpy())


def tiny_config(path, vocab: int):
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 88,
                                "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": vocab,
                                "max_position_embeddings": 64, "model_type": "llama", "hidden_act": "silu"}))
    return str(path)


def test_model_config_keeps_its_vocabulary_and_is_checked(shards, tmp_path, capsys):
    config = tiny_config(tmp_path / "config.json", 64)
    assert main(data_argv(shards) + TINY + ["--steps", "2", "--model-config", config,
                                            "--out", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["model"]["embed.weight"].shape == (64, 32) and state["model"]["lm_head.weight"].shape == (64, 32)
    capsys.readouterr()
    largest = int(max(expected_ids(shards["docs"]["a"], shards["vocab"]).max(),
                      expected_ids(shards["docs"]["val"], shards["vocab"]).max()))
    with pytest.raises(SystemExit):
        main(data_argv(shards) + TINY + ["--steps", "2", "--model-config", tiny_config(tmp_path / "small.json", 10)])
    err = capsys.readouterr().err
    assert f"holds token id {largest}, but the model's vocabulary is 10" in err


def test_tokenizer_without_data_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--tokenizer", "t5-base", "--model", "tiny"])
    assert "Invalid tokenizer: 't5-base' without --data" in capsys.readouterr().err


def test_paper_recipe_runs_a_few_steps_with_local_inputs(shards, tmp_path, capsys):
    config = tiny_config(tmp_path / "config.json", 64)
    argv = ["--recipe", "paper-60m"] + data_argv(shards) + ["--model-config", config, "--seq-len", "16",
                                                            "--eval-windows", "4", "--steps", "3", "--batch-size",
                                                            "4", "--warmup-steps", "1", "--rank", "4", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "recipe paper-60m" in err and "s per step" in err and "not started" not in err
    cfg = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["config"]
    recipe = PRETRAIN_RECIPES["paper-60m"]["train"]
    # the command line's values win, the recipe gives the rest
    assert (cfg["steps"], cfg["batch_size"], cfg["rank"], cfg["warmup_steps"]) == (3, 4, 4, 1)
    for name in ("method", "lr", "update_proj_gap", "scale", "grad_clip", "bf16", "schedule", "min_lr_ratio"):
        assert cfg[name] == recipe[name], name
    # too long for --max-hours: planned, not started
    assert main(argv + ["--out", str(tmp_path / "late"), "--max-hours", "1e-9"]) == CANNOT_RUN
    assert "more than --max-hours 1e-09" in capsys.readouterr().err
    assert not (tmp_path / "late").exists()


def test_paper_recipe_offline_says_what_it_needs(capsys):
    """The real paper-60m recipe offline: the hub's data and tokenizer are named as missing, the 60M model's
    step is measured and its memory estimated -- and nothing starts."""
    assert main(["--recipe", "paper-60m", "--plan-only", "--no-progress"]) == CANNOT_RUN
    err = capsys.readouterr().err
    assert "tokenizer: 't5-base' -- MISSING" in err
    assert "data: datasets 'allenai/c4' configuration 'en'" in err and "-- MISSING" in err.split("data:")[1]
    assert "llama_60m: d 512, 8 layers, vocab 32000" in err
    assert "per process at micro-batches of" in err and "s per step" in err and "10,000 steps" in err


def doc_commands(name: str) -> list[list[str]]:
    """The ``pretrain`` / ``finetune`` / corpus command lines of docs/reproduce_on_gpu.md (launcher dropped)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "reproduce_on_gpu.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            if name in words:
                commands.append(words[words.index(name) + 1:])
    return commands


@pytest.mark.parametrize("module, name", [("golore_lab.lm.pretrain", "pretrain"),
                                          ("golore_lab.lm.finetune", "finetune"),
                                          ("golore_lab.lm.corpus", "golore_lab.lm.corpus")])
def test_every_command_of_the_gpu_page_parses(module, name, monkeypatch):
    """Each command of the page is accepted by its program's parser as written (no option that does not exist)."""
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        real(self, args, namespace)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    commands = doc_commands(name)
    assert len(commands) >= 2
    for argv in commands:
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main(argv)
        assert exit_.value.code == 0, argv
