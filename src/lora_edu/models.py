"""A small decoder-only GPT written to be read, and its checkpoints.

The architecture is the GPT-2 recipe at toy scale (Radford et al., 2019): token and
position embeddings, ``n_layer`` pre-norm blocks ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``,
a final LayerNorm and a linear head over the vocabulary. Its Linear layers carry the names
the LoRA paper uses, so that ``target_modules=["q", "v"]`` adapts exactly :math:`W_q` and
:math:`W_v`:

========  ======================  ==============================
name      shape of ``weight``     role
========  ======================  ==============================
``q``     ``(d_model, d_model)``  query projection :math:`W_q`
``k``     ``(d_model, d_model)``  key projection :math:`W_k`
``v``     ``(d_model, d_model)``  value projection :math:`W_v`
``o``     ``(d_model, d_model)``  output projection :math:`W_o`
``fc1``   ``(d_ff, d_model)``     MLP up-projection
``fc2``   ``(d_model, d_ff)``     MLP down-projection
========  ======================  ==============================

(PyTorch stores a Linear's weight as ``(out_features, in_features)``, i.e. :math:`W_0 \\in
\\mathbb{R}^{d\\times k}` with :math:`d` outputs and :math:`k` inputs, the paper's convention.)

A checkpoint is two files: ``<name>.safetensors`` (the weights) and ``<name>.json`` (the
:class:`GPTConfig` under ``"config"`` plus free-form metadata such as how it was trained).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "PRESETS", "gpt_config", "GPT", "count_bytes", "generate",
           "save_checkpoint", "load_checkpoint", "load_pretrained", "CHECKPOINT_NAMES"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (256 for the byte-level tokenizer of ``lora_edu.data``).
        block_size: the context length: the longest sequence the model accepts.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; ``d_model`` must be divisible by it.
        d_model: width of the residual stream.
        d_ff: hidden width of the MLP (GPT-2 uses ``4 * d_model``).
        dropout: dropout probability on attention weights and residual branches.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dropout":
                if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                    raise ValueError(f"GPTConfig.dropout must be a float in [0, 1), got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{f.name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head "
                             f"({self.n_head}); pick n_head among the divisors of d_model")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**data)


#: Named sizes. ``cpu`` trains in minutes on two cores; ``gpu`` in minutes on a Colab T4;
#: ``tiny`` is for tests.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=128),
    "cpu": GPTConfig(block_size=128, n_layer=4, n_head=4, d_model=128, d_ff=512),
    "gpu": GPTConfig(block_size=256, n_layer=6, n_head=6, d_model=384, d_ff=1536),
}


def gpt_config(preset: str, **overrides: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a named preset, optionally with some fields replaced."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[preset].to_dict(), **overrides})


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which position ``t`` only attends to positions ``<= t``.

    Input and output ``(batch, T, d_model)``. Per head,
    :math:`\\mathrm{softmax}(QK^\\top/\\sqrt{d_h} + M)\\,V` with :math:`Q = xW_q^\\top` etc.
    and :math:`M` the causal mask (:math:`-\\infty` above the diagonal), then the heads are
    concatenated and projected by :math:`W_o`.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # Four separate Linears rather than one fused qkv matrix: LoRA targets them by name.
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (b, t, d) -> (b, n_head, t, d_head): each head attends independently.
        q, k, v = (proj(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))``: ``(batch, T, d_model) -> (batch, T, d_model)`` via ``d_ff``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A decoder-only language model: token ids ``(batch, T)`` -> logits ``(batch, T, vocab)``.

    ``logits[:, t]`` scores the token at position ``t + 1`` and depends on ``idx[:, :t+1]``
    only (the causal mask), so one forward pass trains on every position of a sequence.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a GPTConfig (e.g. gpt_config('cpu')), got "
                            f"{type(cfg).__name__}")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two branches to the residual stream, so the
        # layers writing into it start smaller to keep its variance O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, T, vocab_size)`` for token ids ``idx`` of shape ``(batch, T)``."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an integer tensor of shape (batch, T), got dtype "
                             f"{idx.dtype} and shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds the model's context "
                             f"block_size={self.config.block_size}; crop the input to its last "
                             f"{self.config.block_size} tokens")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats per token; ``targets`` is ``idx`` shifted by one."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_bytes(tensors: Any) -> int:
    """Exact bytes held by an iterable of tensors (``None`` entries count as zero).

    ``numel * element_size`` of each tensor: the storage a tensor needs, the figure that
    memory accounting sums over parameters, gradients and optimizer state.
    """
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``max_new_tokens`` continuations of ``idx`` ``(batch, T)``; returns ``(batch, T + n)``.

    Each step feeds the last ``block_size`` tokens, scales the final logits by
    ``1/temperature``, keeps the ``top_k`` largest (if given) and samples from the softmax.
    Pass a seeded ``generator`` for reproducible text.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use a small value such "
                         f"as 0.1 for nearly greedy sampling")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None (sample from all tokens) or >= 1, got {top_k}")
    was_training = model.training
    model.eval()
    block = model.config.block_size
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block:])[:, -1, :].float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx


def save_checkpoint(model: GPT, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (config + metadata); returns the JSON path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path.with_suffix(".safetensors")))
    record = {"config": model.config.to_dict(), "metadata": metadata or {}}
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return json_path


def load_checkpoint(path: str | Path, config: GPTConfig | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns ``(model, metadata)``.

    If ``config`` is given it must equal the recorded one: loading weights into a model of
    another shape is refused with the differing fields named, before any tensor is read.
    """
    from safetensors.torch import load_file

    path = Path(path)
    json_path, weights_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for p in (json_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} not found; a checkpoint is a pair "
                                    f"<name>.json + <name>.safetensors written by save_checkpoint")
    record = json.loads(json_path.read_text())
    recorded = GPTConfig.from_dict(record["config"])
    if config is not None and config != recorded:
        diff = {k: (v, getattr(recorded, k)) for k, v in config.to_dict().items()
                if v != getattr(recorded, k)}
        raise ValueError(f"checkpoint {path.name} was saved with a different config; "
                         f"(requested, recorded) per field: {diff}. Build the model with the "
                         f"recorded config (pass config=None) or pick the matching checkpoint")
    model = GPT(recorded)
    state = load_file(str(weights_path))
    # strict=True: a missing or extra tensor means the file does not belong to this model.
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the tensors in {weights_path.name} do not fit the config recorded "
                         f"in {json_path.name} ({err}); the two files belong to different "
                         f"checkpoints: re-save them together with save_checkpoint") from None
    return model.to(map_location), record.get("metadata", {})


#: The checkpoints shipped inside the package (``src/lora_edu/assets``).
CHECKPOINT_NAMES = ("gpt-cpu",)


def load_pretrained(name: str = "gpt-cpu", config: GPTConfig | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Load a checkpoint shipped with the package (reproduced by ``scripts/pretrain_checkpoint.py``)."""
    if name not in CHECKPOINT_NAMES:
        raise ValueError(f"unknown packaged checkpoint {name!r}; available: {CHECKPOINT_NAMES}")
    assets = resources.files("lora_edu") / "assets"
    with resources.as_file(assets / f"{name}.json") as json_path:
        return load_checkpoint(json_path, config=config, map_location=map_location)
