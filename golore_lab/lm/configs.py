"""The LLaMA sizes of the paper's pre-training code, as Hugging Face configuration dicts, and the models they build.

The GoLore pre-training code is GaLore's (``torchrun_main.py --model_config configs/llama_60m.json``); its
configurations are Hugging Face ``LlamaConfig`` JSON files. :data:`PAPER_CONFIGS` holds the four sizes of that
family that matter here, with the values of those JSON files (``transformers_version`` and ``architectures``
dropped). Shapes (head size 64 in every one):

==========  ======  ============  =====  ======  =============  ==========================
name        hidden  intermediate  heads  layers  vocab          parameters (closed form)
==========  ======  ============  =====  ======  =============  ==========================
llama_60m   512     1376          8      8       32000          58,073,600
llama_130m  768     2048          12     12      32000          134,105,856
llama_350m  1024    2736          16     24      32000          367,969,280
llama_1b    2048    5461          32     24      32000          1,339,082,752
==========  ======  ============  =====  ======  =============  ==========================

with ``max_sequence_length`` 1024 and ``rms_norm_eps`` 1e-6 in each. The parameter count of an untied LLaMA is
``2 V d + L (4 d^2 + 3 d f + 2 d) + d`` (embedding and output head, four attention and three MLP matrices and two
RMSNorm gains per layer, the final norm): :func:`parameter_count`; ``tests/test_configs.py`` checks it against
both models built on the meta device, for every size.

Vocabulary. The configurations say 32000 and the code pairs them with the ``t5-base`` tokenizer. That tokenizer's
length is 32100, but ids 32000..32099 are its 100 ``<extra_id_*>`` sentinels, which ordinary text never produces
(they come only from the literal strings ``<extra_id_N>``), so a 32000-row embedding covers every id of C4 text.
The package keeps 32000 (the paper's model) and checks instead: :func:`check_vocabulary` raises if a corpus holds
an id >= the model's vocabulary, naming both (the corpus manifest records its largest id).

``pad_token_id``: GaLore's files say -1, the GoLore 60M file says 0. ``transformers`` turns it into the
embedding's ``padding_idx`` (-1 means the last row), a row initialised to zero that never gets a gradient. The
package's own corpus has no padding (documents are concatenated), so :func:`build_hf_llama` drops the key by
default (``keep_pad_token=True`` keeps it, as the paper's code has it); the parameter count is the same.

Which model. :func:`build_hf_llama` is the paper's model as written (``transformers.LlamaForCausalLM``).
:func:`llama_config` maps the same dict onto the package's own LLaMA (:mod:`golore_lab.lm.model`), which is the same
function: ``tests/test_configs.py`` copies the weights of a ``LlamaForCausalLM`` into it
(:func:`load_hf_weights`, which only reorders the rotary dimensions of q and k: the package rotates pairs
``(2i, 2i+1)``, ``transformers`` pairs ``(i, i + hd/2)``) and gets the same logits. The package's model is what
the training loop uses (its module names drive the param groups, FSDP wrapping and memory estimate); the
``transformers`` one is there to show the two agree and for users who want it.

Example::

    >>> cfg = load_model_config("llama_60m")           # or a path to such a JSON file
    >>> parameter_count(cfg)
    58073600
    >>> model_cfg = llama_config(cfg, max_seq_len=256)  # the package's LlamaConfig
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from golore_lab.lm.model import LlamaConfig

_COMMON = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_sequence_length": 1024,
    "model_type": "llama",
    "pad_token_id": -1,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "vocab_size": 32000,
}


def _size(hidden: int, intermediate: int, heads: int, layers: int) -> dict:
    return {**_COMMON, "hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_hidden_layers": layers}


#: The LLaMA configurations of GaLore's / GoLore's pre-training code (``configs/llama_*.json``), by name.
PAPER_CONFIGS: dict[str, dict] = {
    "llama_60m": _size(512, 1376, 8, 8),
    "llama_130m": _size(768, 2048, 12, 12),
    "llama_350m": _size(1024, 2736, 16, 24),
    "llama_1b": _size(2048, 5461, 32, 24),
}

_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def load_model_config(name_or_path: str | Path) -> dict:
    """A LLaMA configuration dict: a name of :data:`PAPER_CONFIGS` or a path to a Hugging Face ``config.json``.

    The dict is validated (:func:`validate`); a missing file, bad JSON or an unsupported field raises
    ``ValueError`` naming the file and the field.
    """
    text = str(name_or_path)
    if text in PAPER_CONFIGS:
        return dict(PAPER_CONFIGS[text])
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"Unknown model config: {text!r} (not a file; names: {', '.join(PAPER_CONFIGS)})")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"Invalid model config {path}: not JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"Invalid model config {path}: a JSON object is needed, got {type(cfg).__name__}")
    return validate(cfg, source=str(path))


def validate(cfg: dict, source: str = "model config") -> dict:
    """Check that ``cfg`` describes a LLaMA the package builds (untied, silu, no grouped-query attention)."""
    for key in _REQUIRED:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Invalid {source}: {key} = {value!r} (a positive integer is needed)")
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"Invalid {source}: model_type = {cfg['model_type']!r} (only 'llama')")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Invalid {source}: hidden_act = {cfg['hidden_act']!r} (only 'silu', the SwiGLU MLP)")
    heads = cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"Invalid {source}: num_key_value_heads = {cfg['num_key_value_heads']!r} "
                         f"(grouped-query attention is not supported; must equal num_attention_heads = {heads})")
    if cfg.get("tie_word_embeddings", False):
        raise ValueError(f"Invalid {source}: tie_word_embeddings = True (the paper's LLaMA has an untied head)")
    if cfg.get("attention_bias", False) or cfg.get("mlp_bias", False):
        raise ValueError(f"Invalid {source}: attention_bias / mlp_bias (the LLaMA's linears have no bias)")
    head = cfg["hidden_size"] / heads
    if head != int(head) or int(head) % 2:
        raise ValueError(f"Invalid {source}: hidden_size / num_attention_heads = {cfg['hidden_size']}/{heads} "
                         "(the head size must be an even integer)")
    return cfg


def parameter_count(cfg: dict) -> int:
    """Closed form: ``2 V d + L (4 d^2 + 3 d f + 2 d) + d`` for an untied LLaMA without biases."""
    validate(cfg)
    V, d, f, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return 2 * V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d


def subspace_parameter_count(cfg: dict) -> int:
    """Parameters in the attention and MLP matrices (the ones trained in a subspace): ``L (4 d^2 + 3 d f)``."""
    validate(cfg)
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return L * (4 * d * d + 3 * d * f)


def max_positions(cfg: dict) -> int:
    """The context the configuration declares (``max_position_embeddings``, else the older ``max_sequence_length``)."""
    return int(cfg.get("max_position_embeddings", cfg.get("max_sequence_length", 2048)))


def llama_config(cfg: dict, max_seq_len: int | None = None, vocab_size: int | None = None) -> LlamaConfig:
    """The package's :class:`~golore_lab.lm.model.LlamaConfig` for a Hugging Face LLaMA configuration dict.

    ``max_seq_len`` (the rotary table length) defaults to the configuration's context; ``vocab_size`` overrides the
    configuration's (the training program keeps the configuration's and checks the corpus against it).
    """
    validate(cfg)
    rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return LlamaConfig(vocab_size=int(vocab_size or cfg["vocab_size"]), dim=cfg["hidden_size"],
                       n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                       hidden_dim=cfg["intermediate_size"], max_seq_len=int(max_seq_len or max_positions(cfg)),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope),
                       init_std=float(cfg.get("initializer_range", 0.02)))


def check_vocabulary(cfg: dict | LlamaConfig, max_token_id: int, source: str = "the corpus") -> None:
    """Raise ``ValueError`` if a token id of ``source`` (its largest is ``max_token_id``) has no embedding row."""
    vocab = cfg.vocab_size if isinstance(cfg, LlamaConfig) else cfg["vocab_size"]
    if max_token_id >= vocab:
        raise ValueError(f"{source} holds token id {max_token_id}, but the model's vocabulary is {vocab} "
                         f"(ids 0..{vocab - 1}): use a model config with vocab_size >= {max_token_id + 1}")


def build_hf_llama(cfg: dict, keep_pad_token: bool = False, device: str | torch.device | None = None) -> nn.Module:
    """``transformers.LlamaForCausalLM`` from the configuration dict (random init; ``device="meta"`` allocates nothing).

    ``keep_pad_token=False`` drops ``pad_token_id`` (see the module docstring: with it, one embedding row is
    zero and frozen).
    """
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    validate(cfg)
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
    if not keep_pad_token:
        fields.pop("pad_token_id", None)
    fields.setdefault("max_position_embeddings", max_positions(cfg))
    fields.setdefault("tie_word_embeddings", False)
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(HFLlamaConfig(**fields))


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Index ``perm`` with ``package_rows = hf_rows[perm]`` within one head: package dim 2i is HF dim i, 2i+1 is i + hd/2."""
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()


@torch.no_grad()
def load_hf_weights(model: nn.Module, hf_model: nn.Module) -> nn.Module:
    """Copy a ``LlamaForCausalLM``'s weights into the package's :class:`~golore_lab.lm.model.Llama` (same shapes).

    Only q and k change order (per head, :func:`rope_permutation`); attention scores are unchanged by a common
    permutation of the q and k dimensions, so both models compute the same logits.
    """
    cfg = model.cfg
    hd = cfg.dim // cfg.n_heads
    perm = rope_permutation(hd)
    rows = (torch.arange(cfg.n_heads)[:, None] * hd + perm[None, :]).flatten()
    source = dict(hf_model.named_parameters())
    model.embed.weight.copy_(source["model.embed_tokens.weight"])
    model.norm.weight.copy_(source["model.norm.weight"])
    model.lm_head.weight.copy_(source["lm_head.weight"])
    for i, block in enumerate(model.layers):
        pre = f"model.layers.{i}."
        block.attn_norm.weight.copy_(source[pre + "input_layernorm.weight"])
        block.mlp_norm.weight.copy_(source[pre + "post_attention_layernorm.weight"])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = source[pre + f"self_attn.{name}.weight"]
            getattr(block.attn, name).weight.copy_(weight[rows] if name in ("q_proj", "k_proj") else weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.mlp, name).weight.copy_(source[pre + f"mlp.{name}.weight"])
    return model


def write_config(name: str, path: str | Path) -> Path:
    """Write :data:`PAPER_CONFIGS` ``[name]`` as a JSON file that ``--model-config`` (and ``transformers``) reads."""
    if name not in PAPER_CONFIGS:
        raise ValueError(f"Unknown model config: {name!r} (choose from {', '.join(PAPER_CONFIGS)})")
    path = Path(path)
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **PAPER_CONFIGS[name]}, indent=2,
                               sort_keys=True) + "\n")
    return path
