"""A LLaMA in plain torch, and the split of its parameters into subspace matrices and full parameters.

Architecture (Touvron et al. 2023, as in the GaLore / GoLore pre-training code)::

    h_0 = E[x]                                         # token embedding, (B, T, d)
    a   = h + Attn(RMSNorm(h))                         # causal multi-head attention with rotary q, k
    h'  = a + W_down (silu(W_gate u) * W_up u),  u = RMSNorm(a)        # SwiGLU MLP
    logits = W_head RMSNorm(h_L)                       # untied output head, (B, T, V)

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g. Rotary embeddings rotate each pair (x_{2i}, x_{2i+1}) of a head
by angle t * theta^(-2i/hd) at position t. Attention is ``F.scaled_dot_product_attention(is_causal=True)``.
Linear layers have no bias; weights are N(0, 0.02^2).

Module names are stable and identify the layers the paper trains in a subspace: ``layers.{i}.attn.{q,k,v,o}_proj``
and ``layers.{i}.mlp.{gate,up,down}_proj``; ``embed``, ``lm_head`` and the ``*norm`` gains stay full
(:func:`llama_param_groups`).

Example::

    >>> cfg = LlamaConfig.preset("tiny", vocab_size=300)
    >>> model = Llama(cfg)
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 300])
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

PRESETS = {
    # name: (dim, n_layers, n_heads, hidden_dim, max_seq_len)
    "tiny": (32, 2, 2, 88, 64),     # tests: ~0.03 M non-embedding parameters
    "cpu": (128, 4, 4, 344, 128),   # figures on a 2-core CPU: ~0.8 M non-embedding parameters
    "late": (64, 2, 2, 172, 32),    # long small-batch CPU runs that reach the noise-dominated phase: ~0.1 M
    "60m": (512, 8, 8, 1376, 256),  # the paper's LLaMA-60M (with its 32k T5 vocabulary: ~58 M parameters)
    "350m": (1024, 24, 16, 2736, 256),   # GaLore's llama_350m widths (32k vocabulary: ~368 M parameters)
    "1b": (2048, 24, 32, 5461, 256),     # GaLore's llama_1b widths (32k vocabulary: ~1.34 B parameters)
}


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of the model. ``hidden_dim`` is the SwiGLU width (the paper's "MLP 1376" for 60M)."""

    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 344
    max_seq_len: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"Invalid dim/n_heads: {self.dim}/{self.n_heads} (head size must be an even integer)")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A named size: ``tiny`` (tests), ``cpu`` (figures), ``late`` (the when-to-switch runs), ``60m`` (the
        paper's), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset: {name!r} (choose from {sorted(PRESETS)})")
        dim, n_layers, n_heads, hidden_dim, max_seq_len = PRESETS[name]
        return replace(cls(dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden_dim,
                           max_seq_len=max_seq_len), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2, -1) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle t * theta^(-2i/hd), each (T, hd/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_{2i}, x_{2i+1}) of x (B, nh, T, hs) by the angles in cos, sin (T, hs/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, nh, T, hs/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        q = apply_rope(split(self.q_proj(x)), cos, sin)
        k = apply_rope(split(self.k_proj(x)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, split(self.v_proj(x)), is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LLaMA; ``forward(idx (B, T) long) -> logits (B, T, V)``.

    ``checkpoint_activations = True``: while autograd records, each block keeps only its input and is recomputed
    in the backward (``torch.utils.checkpoint``, non-reentrant); same values, n_layers × (B, T, d) saved instead
    of every block's tensors.
    """

    checkpoint_activations = False

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> "Llama":
        """N(0, init_std^2) for embeddings and linears, ones for norm gains; all draws from ``generator``."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * self.cfg.init_std)
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.layers:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.lm_head(self.norm(x))  # (B, T, V)


def build_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A model whose initial weights depend only on ``cfg`` and ``seed`` (no global RNG)."""
    return Llama(cfg).init_weights(torch.Generator().manual_seed(seed))


def is_subspace_weight(name: str, param: torch.Tensor) -> bool:
    """True for the weights of attention and MLP linears (``...attn.q_proj.weight``, ``...mlp.up_proj.weight``)."""
    return param.ndim == 2 and (".attn." in f".{name}" or ".mlp." in f".{name}") and name.endswith("_proj.weight")


def llama_param_groups(model: nn.Module, **subspace) -> list[dict]:
    """Split parameters into ``[{"params": matrices, **subspace}, {"params": others}]``.

    ``subspace`` holds the subspace keys of the first group (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type``); leave it empty for plain full-space training. Attention and MLP linears go in the first group;
    embeddings, the output head and the norm gains in the second, as in the paper.
    """
    named = list(model.named_parameters())
    matrices = [p for n, p in named if is_subspace_weight(n, p)]
    others = [p for n, p in named if not is_subspace_weight(n, p)]
    return [{"params": matrices, **subspace}, {"params": others}]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, in subspace matrices, and in embeddings + head."""
    named = list(model.named_parameters())
    return {
        "total": sum(p.numel() for _, p in named),
        "subspace": sum(p.numel() for n, p in named if is_subspace_weight(n, p)),
        "embeddings": sum(p.numel() for n, p in named if n.startswith(("embed", "lm_head"))),
    }
