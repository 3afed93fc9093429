"""Fine-tuning: data, pretrained model, metrics, a few optimizer steps, the CLI and the error paths."""
from __future__ import annotations

import json

import pytest
import torch

from golore_lab.lm import classification as cls_data
from golore_lab.lm.classification import (DataUnavailableError, Splits, accuracy, confusion_matrix, load_splits,
                                          macro_f1, split_examples)

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task", cls_data.TASKS)
def test_splits_are_deterministic_disjoint_and_complete(task, tmp_path):
    splits = load_splits(task)  # from the user cache (fetched on first use)
    # Rebuilt from scratch in another cache root: identical.
    rebuilt = load_splits(task, root=tmp_path, pip_options=())
    assert rebuilt == splits
    parts = [splits.train, splits.val, splits.test]
    texts = [{t for t, _ in p} for p in parts]
    assert all(len(s) == len(p) for s, p in zip(texts, parts))  # no duplicate inside a split
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    n = sum(map(len, parts))
    assert n == {"movie-reviews": 10_568 - 2, "bbc-news": 2_225 - 98}[task]
    assert abs(len(splits.test) / n - 0.1) < 0.01 and abs(len(splits.val) / n - 0.1) < 0.01
    # Every class is in every split, in proportion (stratified).
    for p in parts:
        assert {y for _, y in p} == set(range(splits.num_labels))


def test_task_contents():
    movies = load_splits("movie-reviews")
    assert movies.classes == ("negative", "positive")
    bbc = load_splits("bbc-news")
    assert bbc.classes == ("business", "entertainment", "politics", "sports", "tech")
    # The first ground-truth sentence is rated +2.27, so positive.
    first = "The Rock is destined to be the 21st Century's new ''Conan''"
    assert [y for t, y in movies.train + movies.val + movies.test if t.startswith(first)] == [1]


def test_split_seed_changes_membership_only():
    examples = [(f"text {i}", i % 3) for i in range(300)]
    a = split_examples(examples, 3, split_seed=0)
    b = split_examples(examples, 3, split_seed=1)
    assert a != b
    assert sorted(sum(a, [])) == sorted(sum(b, [])) == sorted(examples)
    assert [len(p) for p in a] == [240, 30, 30]


def test_clear_error_when_data_cannot_be_fetched(tmp_path, monkeypatch):
    # No index and an empty folder of archives: as on a machine without PyPI and without a cache.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-archives"))
    with pytest.raises(DataUnavailableError) as err:
        load_splits("movie-reviews", root=tmp_path / "cache")
    message = str(err.value)
    assert "vaderSentiment==3.3.2" in message and "pip download" in message and str(tmp_path / "cache") in message
    assert not (tmp_path / "cache" / "movie-reviews").exists()  # nothing half-written
    with pytest.raises(ValueError, match="Invalid task: 'glue'"):
        load_splits("glue")


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_on_a_hand_made_batch():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    assert confusion_matrix(pred, target, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert accuracy(pred, target) == pytest.approx(4 / 6)
    # Per class F1 = 2TP / (2TP + FP + FN): class 0: 4/5, class 1: 2/4, class 2: 2/3.
    assert macro_f1(pred, target, 3) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    # A class never predicted and never present counts 0 (scikit-learn's zero_division=0).
    assert macro_f1(torch.tensor([0, 1]), torch.tensor([0, 1]), 3) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------ model

SENTENCES = ["A gem of a film.", "Tedious, overlong and dull, with nothing to say about anything at all.",
             "Shares in the bank rose 3% after profits beat forecasts."]


@pytest.fixture(scope="module")
def classifier():
    from golore_lab.lm.classifier import load_classifier

    return load_classifier(num_labels=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from golore_lab.lm.classifier import load_tokenizer

    return load_tokenizer()


def test_pretrained_model_loads_offline(tmp_path):
    # A fresh interpreter with a dead hub endpoint and no offline flag of its own: any download would fail.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=os.getcwd())
    code = ("import torch; torch.set_num_threads(1)\n"
            "from golore_lab.lm.classifier import load_classifier, load_tokenizer\n"
            "m, tok = load_classifier(5, seed=0), load_tokenizer()\n"
            "b = tok(['offline'], return_tensors='pt')\n"
            "print(tuple(m(b['input_ids'], b['attention_mask']).shape), sum(p.numel() for p in m.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["(1,", "5)", str(22_565_376 + 384 * 5 + 5)]


def test_mean_pooled_encoder_matches_sentence_transformers(classifier, tokenizer):
    """Two independent code paths over the same files: ours (transformers + mean_pool) and sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    from golore_lab.lm.classifier import model_path

    st = SentenceTransformer(str(model_path()), device="cpu", local_files_only=True)
    reference = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)  # (3, 384)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    classifier.eval()
    with torch.no_grad():
        ours = classifier.embed(batch["input_ids"], batch["attention_mask"])  # (3, 384), not normalised
    # all-MiniLM-L6-v2's pipeline ends with a Normalize module, so compare directions; padding must not matter.
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), reference, atol=1e-5, rtol=1e-5)
    # Related sentences are closer than unrelated ones: the weights really are the trained ones.
    sims = reference @ reference.T
    assert sims[0, 1] > sims[0, 2]


def test_subspace_parameters_are_the_attention_and_mlp_weights(classifier):
    from golore_lab.lm.classifier import subspace_parameters

    mats, rest = subspace_parameters(classifier)
    assert len(mats) == 6 * 6 and all(p.ndim == 2 for p in mats)
    assert sorted({tuple(p.shape) for p in mats}) == [(384, 384), (384, 1536), (1536, 384)]
    names = {id(p): n for n, p in classifier.named_parameters()}
    rest_names = [names[id(p)] for p in rest]
    assert "head.weight" in rest_names and "encoder.embeddings.word_embeddings.weight" in rest_names
    assert all("LayerNorm" in n or n.endswith("bias") or "embeddings" in n or n.startswith("head") for n in rest_names)
    assert len(mats) + len(rest) == len(list(classifier.parameters()))


def test_head_initialisation_is_seeded_and_leaves_global_rng_alone(classifier):
    from golore_lab.lm.classifier import SentenceClassifier, load_classifier

    state = torch.get_rng_state()
    load_classifier(3, seed=1)
    a = SentenceClassifier(classifier.encoder, 3, seed=1).head.weight
    b = SentenceClassifier(classifier.encoder, 3, seed=1).head.weight
    c = SentenceClassifier(classifier.encoder, 3, seed=2).head.weight
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="Invalid num_labels: 1"):
        SentenceClassifier(classifier.encoder, 1)
