"""The LLaMA: shapes, causality, rotary embeddings, seeded init, and the subspace / full parameter split."""
from __future__ import annotations

import pytest
import torch

from golore_lab.lm.model import (Llama, LlamaConfig, apply_rope, build_model, count_parameters, rope_tables,
                                 llama_param_groups)


def test_shapes_and_presets():
    model = build_model(LlamaConfig.preset("tiny", vocab_size=100))
    assert model(torch.zeros(3, 7, dtype=torch.long)).shape == (3, 7, 100)
    paper = Llama(LlamaConfig.preset("60m", vocab_size=32000))
    counts = count_parameters(paper)
    # LLaMA-60M with the T5 vocabulary, counted in closed form: untied embedding and head (2 V d), per layer four
    # d x d attention and three d x f MLP matrices plus two RMSNorm gains, and the final norm.
    V, d, f, layers = 32000, 512, 1376, 8
    assert counts["subspace"] == layers * (4 * d * d + 3 * d * f)
    assert counts["total"] == 2 * V * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d == 58_073_600


def test_causal():
    model = build_model(LlamaConfig.preset("tiny", vocab_size=50), seed=1)
    x = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    # The prefix is the same function of the same tokens; float32 can differ only by the summation order of the
    # longer sequence's matmuls, a few ulps of the logits (|logit| < 1 here): 1e-5. A leak from the future moves
    # them by O(0.1), as the changed positions show.
    assert (a[:, :6] - b[:, :6]).abs().max() < 1e-5
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-2


def test_rope_scores_depend_only_on_offset():
    cos, sin = rope_tables(8, 16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    rot = lambda v: apply_rope(v.expand(1, 1, 16, 8), cos, sin)[0, 0]  # (T, hs)
    scores = rot(q) @ rot(k).T  # (T, T)
    # float32 round-off: the angles reach θ = 15 rad, computed to ~eps·θ, so a rotated vector is off by
    # ~eps·(1 + θ)·|v| and a score by twice that times |q||k|; 4x that bound is the tolerance (~5e-5 here).
    # A wrong rotation moves the scores by O(|q||k|).
    eps = torch.finfo(torch.float32).eps
    tol = 4 * eps * (1 + 15) * q.norm() * k.norm()
    assert (scores[3, 1] - scores[10, 8]).abs() < tol
    assert (scores[3, 0] - scores[10, 8]).abs() > 100 * tol  # a different offset: a different score
    assert (rot(q).norm(dim=-1) - q.norm()).abs().max() < 4 * eps * (1 + 15) * q.norm()


def test_seeded_init_uses_no_global_rng():
    cfg = LlamaConfig.preset("tiny", vocab_size=64)
    torch.manual_seed(123)
    a = build_model(cfg, seed=5).state_dict()
    torch.manual_seed(456)
    b = build_model(cfg, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(cfg, seed=6).state_dict()
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_param_split_matches_the_paper():
    model = build_model(LlamaConfig.preset("tiny", vocab_size=64))
    sub, full = llama_param_groups(model, rank=4, update_proj_gap=10)
    names = {id(p): n for n, p in model.named_parameters()}
    sub_names = sorted(names[id(p)] for p in sub["params"])
    full_names = sorted(names[id(p)] for p in full["params"])
    assert len(sub_names) == 2 * 7 and all(".attn." in n or ".mlp." in n for n in sub_names)
    assert "embed.weight" in full_names and "lm_head.weight" in full_names
    assert all(n.endswith("norm.weight") for n in full_names if n not in ("embed.weight", "lm_head.weight"))
    assert sub["rank"] == 4 and "rank" not in full


@pytest.mark.parametrize("field, value, message", [
    ("n_heads", 3, "head size"), ("dim", 0, "Invalid dim: 0"), ("vocab_size", -1, "Invalid vocab_size: -1")])
def test_bad_config_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="Unknown model preset: 'huge'"):
        LlamaConfig.preset("huge")
