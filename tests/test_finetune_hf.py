"""``finetune --model`` with a tiny random RoBERTa the tests save, on a GLUE-format (MRPC-layout) task of the tests'
own, through the real program: metrics in the run folder, exact resume, the paper-glue recipe with overrides, and
the recipe planned (not started) when its model and data are not here."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from golore_lab.lm.finetune import main
from golore_lab.lm.recipes import CANNOT_RUN, FINETUNE_RECIPES

pytest.importorskip("transformers")

WORDS = "the a quick slow fox dog cat runs sleeps over under tree river hill red blue".split()
COMMON = ["--no-progress", "--max-length", "24", "--batch-size", "4", "--rank", "2", "--update-proj-gap", "2",
          "--eval-every", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A 2-layer RoBERTa (hidden 32) with random weights and a word-level tokenizer with RoBERTa's special tokens
    and pair template, saved like a hub model (a base model: the program adds the classification head)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    folder = tmp_path_factory.mktemp("tiny-roberta")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                            sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(str(folder))
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        RobertaModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def paraphrases(tmp_path_factory):
    """An MRPC-layout task: sentence1, sentence2, label = 1 iff the two share their first word (CSV + JSON Lines)."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)

    def rows(n):
        out = []
        for _ in range(n):
            a, b = (" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(2))
            if rng.random() < 0.5:
                b = a.split()[0] + " " + b
            out.append({"sentence1": a, "sentence2": b, "label": int(a.split()[0] == b.split()[0])})
        return out

    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence1", "sentence2", "label"])
        writer.writeheader()
        writer.writerows(rows(48))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(20)))
    return ["--train-file", str(folder / "train.csv"), "--validation-file", str(folder / "dev.jsonl")]


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_any_classifier_on_a_glue_format_task_through_the_program(tiny_roberta, paraphrases, tmp_path, capsys):
    argv = ["--model", tiny_roberta, "--task", "glue/mrpc", *paraphrases, *COMMON, "--steps", "4", "--lr", "1e-3",
            "--method", "golore@50"]
    torch.manual_seed(1)  # the run depends on --seed only, not on torch's global generator
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # GLUE's MRPC metrics: accuracy, F1 of class 1 and their mean, on the 20 validation pairs
    assert {"val_loss", "val_accuracy", "val_f1", "val_combined_score"} <= set(final)
    assert final["val_combined_score"] == pytest.approx((final["val_accuracy"] + final["val_f1"]) / 2)
    assert final["val_accuracy"] * 20 == pytest.approx(round(final["val_accuracy"] * 20))
    rows = rows_of(tmp_path / "a")
    assert [r["step"] for r in rows if "val_f1" in r] == [0, 2, 4]
    header = (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "train_loss", "val_loss", "val_accuracy", "val_f1"} <= set(header)
    # stopped and resumed: the same run, dropout included
    torch.manual_seed(2)
    assert main(argv + ["--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert main(argv + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    keep = ("step", "tokens", "train_loss", "val_loss", "val_f1")
    assert [{k: r.get(k) for k in keep} for r in rows_of(tmp_path / "b")] == [{k: r.get(k) for k in keep} for r in rows]
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=False)["model"] for f in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the subspace is the encoder blocks' linears: 6 per layer, the head and embeddings train in full
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    ranked = [g for g in state["optimizer"]["param_groups"] if g.get("rank")]
    assert len(ranked) == 1 and len(ranked[0]["params"]) == 2 * 6
    # another seed is another run (head, batches, dropout)
    assert main(argv + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    assert rows_of(tmp_path / "c")[1]["train_loss"] != rows[1]["train_loss"]


def test_files_without_a_task_score_accuracy(tiny_roberta, paraphrases, tmp_path, capsys):
    assert main(["--model", tiny_roberta, *paraphrases, *COMMON, "--steps", "2", "--out", str(tmp_path / "r")]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "val_accuracy" in final and "val_f1" not in final


def test_bad_hf_options_are_named(tiny_roberta, paraphrases, capsys):
    for argv, message in [
        (["--model", tiny_roberta, "--task", "glue/imdb", *paraphrases], "Unknown GLUE task: 'glue/imdb'"),
        (["--model", tiny_roberta, "--train-file", paraphrases[1]], "give both (--train-file and --validation-file)"),
        (["--model", tiny_roberta], "Invalid task: None"),
        (["--task", "imdb"], "Invalid task: 'imdb'"),
    ]:
        with pytest.raises(SystemExit):
            main(argv + ["--no-progress"])
        assert message in capsys.readouterr().err, argv


def test_paper_glue_recipe_with_overrides_runs(tiny_roberta, paraphrases, tmp_path, capsys):
    argv = ["--recipe", "paper-glue", "--model", tiny_roberta, *paraphrases, "--max-length", "24", "--steps", "3",
            "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "recipe paper-glue" in err and "s per step" in err and "not started" not in err
    cfg = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["config"]
    recipe = FINETUNE_RECIPES["paper-glue"]["train"]
    assert cfg["steps"] == 3
    for name in ("method", "lr", "batch_size", "rank", "scale", "update_proj_gap", "seed"):
        assert cfg[name] == recipe[name], name
    # without --steps, 30 epochs of the 48 examples in batches of 16: 90 steps; too long for --max-hours
    assert main(argv[:-3] + ["--no-progress", "--max-hours", "1e-9", "--out", str(tmp_path / "no")]) == CANNOT_RUN
    err = capsys.readouterr().err
    assert "90 steps" in err and "more than --max-hours" in err and not (tmp_path / "no").exists()


def test_paper_glue_recipe_offline_names_what_is_missing(capsys):
    assert main(["--recipe", "paper-glue", "--plan-only", "--no-progress"]) == CANNOT_RUN
    err = capsys.readouterr().err
    assert "data: GLUE glue/mrpc from 'nyu-mll/glue' -- MISSING" in err
    assert "model: 'roberta-base' -- MISSING" in err and "not measured (the model is missing)" in err
