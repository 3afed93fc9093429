"""The paper's LLaMA configurations: shapes, closed-form counts on the meta device, and the package's LLaMA computing
the same function as transformers' LlamaForCausalLM built from the same configuration."""
from __future__ import annotations

import json
import re

import pytest
import torch

from golore_lab.lm import configs
from golore_lab.lm.configs import (PAPER_CONFIGS, build_hf_llama, check_vocabulary, llama_config, load_hf_weights,
                                   load_model_config, parameter_count, subspace_parameter_count, write_config)
from golore_lab.lm.model import Llama, count_parameters

transformers = pytest.importorskip("transformers")

# name: (hidden, intermediate, heads, layers), from the configs/llama_*.json files of the paper's code.
SHAPES = {"llama_60m": (512, 1376, 8, 8), "llama_130m": (768, 2048, 12, 12), "llama_350m": (1024, 2736, 16, 24),
          "llama_1b": (2048, 5461, 32, 24)}


def test_paper_shapes():
    for name, (d, f, heads, layers) in SHAPES.items():
        cfg = PAPER_CONFIGS[name]
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                cfg["num_hidden_layers"]) == (d, f, heads, layers)
        assert cfg["vocab_size"] == 32000 and cfg["max_sequence_length"] == 1024 and cfg["rms_norm_eps"] == 1e-6


def test_closed_form_counts_by_hand():
    # 60M: 2*32000*512 + 8*(4*512^2 + 3*512*1376 + 2*512) + 512, term by term.
    assert parameter_count(PAPER_CONFIGS["llama_60m"]) == 32_768_000 + 8 * (1_048_576 + 2_113_536 + 1024) + 512
    # 1B: 2*32000*2048 + 24*(4*2048^2 + 3*2048*5461 + 2*2048) + 2048.
    assert parameter_count(PAPER_CONFIGS["llama_1b"]) == 131_072_000 + 24 * (16_777_216 + 33_552_384 + 4096) + 2048


def test_docstring_table_is_the_closed_form():
    rows = re.findall(r"^(llama_\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d,]+)\s*$", configs.__doc__, re.M)
    assert [r[0] for r in rows] == list(SHAPES)
    for name, d, f, heads, layers, vocab, count in rows:
        assert tuple(map(int, (d, f, heads, layers))) == SHAPES[name]
        assert int(vocab) == PAPER_CONFIGS[name]["vocab_size"]
        assert int(count.replace(",", "")) == parameter_count(PAPER_CONFIGS[name])


@pytest.mark.parametrize("name", list(SHAPES))
def test_counts_match_both_models_on_meta(name):
    """Nothing is allocated: both models are built on the meta device, up to the 1B."""
    cfg = PAPER_CONFIGS[name]
    hf = build_hf_llama(cfg, device="meta")
    assert sum(p.numel() for p in hf.parameters()) == parameter_count(cfg)
    with torch.device("meta"):
        ours = Llama(llama_config(cfg, max_seq_len=256))
    counts = count_parameters(ours)
    assert counts["total"] == parameter_count(cfg)
    assert counts["subspace"] == subspace_parameter_count(cfg)
    # The subspace matrices are the same set of shapes in both models.
    hf_mats = sorted(tuple(p.shape) for n, p in hf.named_parameters() if n.endswith("_proj.weight"))
    ours_mats = sorted(tuple(p.shape) for n, p in ours.named_parameters() if n.endswith("_proj.weight"))
    assert hf_mats == ours_mats


def test_package_llama_is_the_transformers_llama():
    """Same weights (q, k rows reordered for the rotary convention) -> same logits, to float32 round-off."""
    cfg = {**PAPER_CONFIGS["llama_60m"], "hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4,
           "num_hidden_layers": 2, "vocab_size": 97}
    torch.manual_seed(0)  # transformers' own init reads the global RNG; only the copy matters here
    hf = build_hf_llama(cfg).eval()
    ours = load_hf_weights(Llama(llama_config(cfg, max_seq_len=32)), hf).eval()
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = hf(input_ids=idx).logits
        b = ours(idx)
    # |logits| ~ 0.1 here; float32 with two summation orders agrees to ~1e-6. A wrong rotary pairing or a
    # missing permutation changes them by O(1e-2) (checked below).
    assert (a - b).abs().max() < 1e-5
    with torch.no_grad():
        broken = load_hf_weights(Llama(llama_config(cfg, max_seq_len=32)), hf)
        for i, block in enumerate(broken.layers):  # k without the rotary reordering
            block.attn.k_proj.weight.copy_(hf.model.layers[i].self_attn.k_proj.weight)
        assert (broken(idx) - a).abs().max() > 1e-3


def test_load_model_config_file_and_errors(tmp_path):
    path = write_config("llama_130m", tmp_path / "llama_130m.json")
    assert load_model_config(path)["hidden_size"] == 768
    assert load_model_config("llama_350m") == PAPER_CONFIGS["llama_350m"]
    with pytest.raises(ValueError, match="Unknown model config: 'llama_2m'"):
        load_model_config("llama_2m")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_model_config(tmp_path / "bad.json")
    for key, value, message in [("hidden_size", 0, "hidden_size = 0"),
                                ("num_key_value_heads", 4, "grouped-query"),
                                ("tie_word_embeddings", True, "untied"),
                                ("hidden_act", "gelu", "hidden_act = 'gelu'"),
                                ("num_attention_heads", 7, "head size")]:
        (tmp_path / "x.json").write_text(json.dumps({**PAPER_CONFIGS["llama_60m"], key: value}))
        with pytest.raises(ValueError, match=message):
            load_model_config(tmp_path / "x.json")
    missing = dict(PAPER_CONFIGS["llama_60m"])
    del missing["vocab_size"]
    (tmp_path / "x.json").write_text(json.dumps(missing))
    with pytest.raises(ValueError, match="vocab_size = None"):
        load_model_config(tmp_path / "x.json")


def test_llama_config_mapping_and_vocabulary_check():
    mc = llama_config(PAPER_CONFIGS["llama_60m"], max_seq_len=256)
    assert (mc.dim, mc.hidden_dim, mc.n_heads, mc.n_layers, mc.vocab_size, mc.max_seq_len, mc.norm_eps) == (
        512, 1376, 8, 8, 32000, 256, 1e-6)
    assert llama_config(PAPER_CONFIGS["llama_60m"]).max_seq_len == 1024
    check_vocabulary(PAPER_CONFIGS["llama_60m"], 31999)
    with pytest.raises(ValueError, match="token id 32099.*vocabulary is 32000"):
        check_vocabulary(mc, 32099)
