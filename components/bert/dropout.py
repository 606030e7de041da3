"""Dropout whose masks cost a quarter of the random draws, for training on a CPU.

PyTorch's CPU dropout draws one random number per element (`bernoulli_`, one MT19937 stream, one
thread). Fine-tuning on MovieLens-100K (max_len 200) spent 35 % of each step there, most of it
on the attention weights ([batch, heads, length, length]); dropout on those also keeps attention
off the fused CPU kernel. Here each 64-bit draw decides four elements: an element is dropped when
its 16-bit slice of the draw, read as 0..65535, is below round(p * 65536). The masks are the same
Bernoulli masks up to that rounding of p (at most 2^-17 off), scaled by 1 / (1 - p) as rounded,
and come from torch's default generator, so seeded runs repeat. benchmarks/README.md "CPU
fine-tuning speed" has the measurements.

`use_packed_dropout` switches a `transformers` BERT encoder to it: its dropout modules, and its
attention through `packed_dropout_attention` (registered with transformers' attention interface),
which hands over to the fused scaled-dot-product kernel whenever no dropout applies (evaluation,
export), so inference is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "recforge_packed_dropout"
_LEVELS = 1 << 16


def _threshold(p: float) -> int:
    threshold = round(p * _LEVELS)
    if not 0 <= threshold < _LEVELS:
        raise ValueError(f"dropout probability must be in [0, 1 - 2^-17), got {p}")
    return threshold


def drop_mask(shape: torch.Size, p: float, device: torch.device | None = None) -> torch.Tensor:
    """A boolean mask, True where an element is dropped (probability round(p * 65536) / 65536)."""
    n = shape.numel()
    draws = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    # int16 slices of uniform 64-bit draws are uniform on [-32768, 32767].
    return (draws.view(torch.int16)[:n] < _threshold(p) - _LEVELS // 2).view(shape)


def packed_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    # One pass each way for the mask (where keeps the boolean mask for backward: one byte an
    # element); an out-of-place masked_fill would copy first.
    return torch.where(drop_mask(x.shape, p, x.device), 0.0, x) * (1.0 / _keep(p))


def _keep(p: float) -> float:
    return 1.0 - _threshold(p) / _LEVELS


class PackedDropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same place in a module tree) drawing its masks by `drop_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_dropout(x, self.p, self.training)


def packed_dropout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: softmax(q k^T * scaling + mask) v with the
    attention weights dropped by `packed_dropout`; without dropout, the fused SDPA kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not dropout:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=0.0, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # The weights [B, heads, L, L] are the big tensor, each pass over them a cost: both scalings
    # go onto the small ones (query, and value for dropout's 1 / keep).
    weights = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        weights = weights.add_(attention_mask)
    weights = torch.softmax(weights, dim=-1)
    weights = torch.where(drop_mask(weights.shape, dropout, weights.device), 0.0, weights)
    return torch.matmul(weights, value * (1.0 / _keep(dropout))).transpose(1, 2).contiguous(), weights


def use_packed_dropout(encoder: nn.Module) -> None:
    """Switch a transformers BERT encoder's dropout, attention weights included, to packed masks
    (in place; parameters and state dict untouched)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_dropout_attention)
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, PackedDropout(child.p))
    encoder.config._attn_implementation = ATTENTION
