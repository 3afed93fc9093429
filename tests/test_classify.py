"""Any classifier on GLUE-layout data: GLUE's metrics against hand-computed values, GLUE through datasets (a local
folder in the hub repository's layout), CSV / JSON Lines files, and a tiny random BERT trained by SubspaceAdamW."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from golore_lab.lm import classify
from golore_lab.lm.classify import (Examples, build_classifier, encoder_linears, evaluate, f1_binary, finetune,
                                    glue_metrics, load_glue, matthews_corrcoef, num_labels, read_labelled_file)

transformers = pytest.importorskip("transformers")

WORDS = "the a quick slow fox dog cat runs sleeps over under tree river hill red blue".split()


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_by_hand():
    label = [1, 1, 0, 0, 1]
    pred = [1, 0, 0, 1, 1]
    # TP = 2, TN = 1, FP = 1, FN = 1.
    assert classify.accuracy(pred, label) == 3 / 5
    assert f1_binary(pred, label) == 2 * 2 / (2 * 2 + 1 + 1)
    assert matthews_corrcoef(pred, label) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2), abs=1e-15)
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # one predicted class: undefined, 0 by convention
    assert matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 1]) == pytest.approx(
        # C = [[1,0,0],[0,1,1],[0,0,1]]: c = 3, s = 4, t = (1,2,1), p = (1,1,2)
        (3 * 4 - (1 + 2 + 2)) / math.sqrt((16 - (1 + 1 + 4)) * (16 - (1 + 4 + 1))), abs=1e-15)
    # Pearson: x = (1, 2, 2, 10), y = (1, 3, 2, 4): sum dx dy = 13.5, sum dx^2 = 52.75, sum dy^2 = 5.
    # Spearman: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    x, y = [1, 2, 2, 10], [1, 3, 2, 4]
    assert classify.pearson(x, y) == pytest.approx(13.5 / math.sqrt(52.75 * 5), abs=1e-12)
    assert classify.spearman(x, y) == pytest.approx(3 / math.sqrt(10), abs=1e-12)


def test_glue_metric_sets():
    assert glue_metrics("glue/cola", [1, 0], [1, 0]) == {"matthews_correlation": 1.0}
    m = glue_metrics("mrpc", [1, 0, 0, 1, 1], [1, 1, 0, 0, 1])
    assert m == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "combined_score": (0.6 + 2 / 3) / 2})
    s = glue_metrics("glue/stsb", [1, 2, 2, 10], [1, 3, 2, 4])
    assert set(s) == {"pearson", "spearmanr", "combined_score"}
    assert set(glue_metrics("glue/mnli", [0, 1, 2], [0, 1, 1])) == {"accuracy"}
    assert glue_metrics(None, [0, 1], [0, 0]) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="Unknown GLUE task: 'glue/imdb'"):
        glue_metrics("glue/imdb", [0], [0])


# --------------------------------------------------------------------------------------------- data
def sentences(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        out.append((s, int("fox" in s.split())))
    return out


def write_glue_folder(root):
    """Parquet files laid out like the hub's nyu-mll/glue repository: <task>/<split>-00000-of-00001.parquet."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def write(task, split, table):
        (root / task).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), root / task / f"{split}-00000-of-00001.parquet")

    for split, n in (("train", 20), ("validation", 6)):
        s = sentences(n, 1 if split == "train" else 2)
        write("mrpc", split, {"sentence1": [a for a, _ in s], "sentence2": [a[::-1] for a, _ in s],
                              "label": [y for _, y in s], "idx": list(range(n))})
        write("stsb", split, {"sentence1": [a for a, _ in s], "sentence2": [a for a, _ in s],
                              "label": [float(len(a) % 5) + 0.5 for a, _ in s], "idx": list(range(n))})
    for split, n in (("train", 12), ("validation_matched", 5), ("validation_mismatched", 4)):
        s = sentences(n, 3)
        write("mnli", split, {"premise": [a for a, _ in s], "hypothesis": ["the dog"] * n,
                              "label": [i % 3 for i in range(n)], "idx": list(range(n))})


def test_load_glue_local_repository_layout(tmp_path):
    pytest.importorskip("datasets")
    write_glue_folder(tmp_path / "glue")
    mrpc = load_glue("glue/mrpc", source=str(tmp_path / "glue"))
    assert len(mrpc["train"]) == 20 and len(mrpc["validation"]) == 6
    assert mrpc["train"].columns == ("sentence1", "sentence2") and len(mrpc["train"].texts[0]) == 2
    assert mrpc["train"].labels == [y for _, y in sentences(20, 1)]
    mnli = load_glue("mnli", source=str(tmp_path / "glue"))
    assert len(mnli["validation"]) == 5  # validation_matched
    assert len(load_glue("mnli", source=str(tmp_path / "glue"), validation_split="validation_mismatched")
               ["validation"]) == 4
    stsb = load_glue("stsb", source=str(tmp_path / "glue"))
    assert all(isinstance(y, float) for y in stsb["train"].labels) and num_labels(stsb, "stsb") == 1
    with pytest.raises(ValueError, match="No files .*cola.*train"):
        load_glue("cola", source=str(tmp_path / "glue"))


def test_local_files(tmp_path):
    train, val = sentences(10, 4), sentences(4, 5)
    with open(tmp_path / "train.csv", "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["sentence", "label"])
        w.writerows([(s, "positive" if y else "negative") for s, y in train])
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"sentence": s, "label": "positive" if y else "negative"})
                                                + "\n" for s, y in val))
    data = read_labelled_file(tmp_path / "train.csv", tmp_path / "val.jsonl")
    assert data["train"].label_names == ("negative", "positive")
    assert data["train"].labels == [y for _, y in train] and data["validation"].labels == [y for _, y in val]
    assert data["train"].columns == ("sentence",) and num_labels(data) == 2
    # Pairs, integer labels, TSV.
    (tmp_path / "p.tsv").write_text("question\tsentence\tlabel\nwho\tthe fox\t1\nwhat\tthe dog\t0\n")
    pairs = read_labelled_file(tmp_path / "p.tsv", tmp_path / "p.tsv")
    assert pairs["train"].columns == ("question", "sentence") and pairs["train"].labels == [1, 0]
    # Errors name the bad value.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"sentence": "x", "label": "neutral"}) + "\n")
    with pytest.raises(ValueError, match="Label 'neutral' of the validation file is not in the training labels"):
        read_labelled_file(tmp_path / "train.csv", tmp_path / "bad.jsonl")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"review": "x", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="no text columns of a GLUE layout .* in 'review', 'label'"):
        read_labelled_file(tmp_path / "cols.jsonl", tmp_path / "cols.jsonl")
    with pytest.raises(ValueError, match="no column 'sentence1'"):
        read_labelled_file(tmp_path / "train.csv", tmp_path / "val.jsonl", task="glue/rte")
    with pytest.raises(ValueError, match="No such file"):
        read_labelled_file(tmp_path / "nope.csv", tmp_path / "val.jsonl")


# -------------------------------------------------------------------------------------- tiny BERT
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with random weights and a word-level vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(str(folder))
    return str(folder)


def test_finetune_tiny_bert_with_subspace_adamw(tiny_bert):
    data = sentences(8, 6)
    train = Examples([(s,) for s, _ in data], [y for _, y in data], ("sentence",))
    model, tok = build_classifier(tiny_bert, num_labels=2, seed=0)
    before = evaluate(model, tok, train, task="glue/sst2")
    out = finetune(model, tok, train, steps=30, batch_size=8, lr=1e-2, method="golore@20", rank=4,
                   update_proj_gap=10, seed=0)
    after = evaluate(model, tok, train, task="glue/sst2")
    opt = out["optimizer"]
    rank_group = next(g for g in opt.param_groups if g.get("rank"))
    # The rank group is exactly the encoder blocks' linears (q, k, v, attention output, intermediate, output per
    # layer), and GoLore@20% of 30 steps switches at step 24.
    assert len(rank_group["params"]) == 2 * 6
    assert all(".layer." in n and "pooler" not in n and "classifier" not in n for n in rank_group["param_names"])
    assert rank_group["switch_step"] == 24
    assert all(opt.state[p]["proj"].shape[1] == 4 for p in rank_group["params"])
    # It fits the 8 examples: from ln 2 (a random head) to well under ln 2 / 7 (measured: 0.002..0.01 over
    # seeds 0, 1, 2).
    assert abs(before["loss"] - math.log(2)) < 0.01 and after["loss"] < 0.1 and after["accuracy"] == 1.0
    # Deterministic given the seed (dropout included); another seed is another run.
    model2, _ = build_classifier(tiny_bert, num_labels=2, seed=0)
    assert finetune(model2, tok, train, steps=30, batch_size=8, lr=1e-2, update_proj_gap=10, seed=0)["losses"] \
        == out["losses"]
    model3, _ = build_classifier(tiny_bert, num_labels=2, seed=1)
    assert finetune(model3, tok, train, steps=5, batch_size=8, lr=1e-2, update_proj_gap=10, seed=1)["losses"] \
        != out["losses"][:5]


def test_subspace_update_has_rank_r(tiny_bert):
    """Within one refresh period (no weight decay) each encoder matrix moves by P N, of rank <= r = 4."""
    data = sentences(16, 7)
    train = Examples([(s,) for s, _ in data], [y for _, y in data], ("sentence",))
    model, tok = build_classifier(tiny_bert, num_labels=2, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = finetune(model, tok, train, steps=10, batch_size=4, lr=1e-2, method="galore", rank=4,
                   update_proj_gap=10)["optimizer"]
    names = next(g for g in opt.param_groups if g.get("rank"))["param_names"]
    for name, p in model.named_parameters():
        delta = (p.detach() - start[name]).double()
        if name in names:
            s = torch.linalg.svdvals(delta)
            # float32 round-off of a rank-4 sum of updates: ~1e-7 relative; a full-rank update is O(1).
            assert s[0] > 0 and s[4] < 1e-5 * s[0], (name, s[:6])
        elif name.startswith("classifier"):
            assert delta.abs().max() > 0


def test_regression_and_pairs_tiny_bert(tmp_path, tiny_bert):
    pytest.importorskip("datasets")
    write_glue_folder(tmp_path / "glue")
    stsb = load_glue("glue/stsb", source=str(tmp_path / "glue"))
    model, tok = build_classifier(tiny_bert, num_labels=num_labels(stsb, "glue/stsb"), seed=0)
    assert model.config.problem_type == "regression" and model.classifier.out_features == 1
    finetune(model, tok, stsb["train"], steps=3, batch_size=4, method="galore", update_proj_gap=2)
    metrics = evaluate(model, tok, stsb["validation"], task="glue/stsb")
    assert set(metrics) == {"loss", "pearson", "spearmanr", "combined_score"}
    mnli = load_glue("glue/mnli", source=str(tmp_path / "glue"))
    model, tok = build_classifier(tiny_bert, num_labels=3, seed=0)
    finetune(model, tok, mnli["train"], steps=2, batch_size=4, method="full")
    assert set(evaluate(model, tok, mnli["validation"], task="glue/mnli")) == {"loss", "accuracy"}


def test_encoder_linears_and_errors(tiny_bert):
    assert encoder_linears("bert.encoder.layer.0.attention.self.query", None)
    assert encoder_linears("model.layers.11.mlp.up_proj", None)
    assert not encoder_linears("bert.pooler.dense", None) and not encoder_linears("classifier", None)
    with pytest.raises(ValueError, match="Cannot load model"):
        build_classifier(tiny_bert + "-missing", 2)
    model, tok = build_classifier(tiny_bert, num_labels=2)
    ex = Examples([("the fox",)], [1], ("sentence",))
    with pytest.raises(ValueError, match="lb-galore"):
        finetune(model, tok, ex, steps=1, method="lb-galore")
