"""Packed dropout (`components.bert.dropout`): the same Bernoulli masks as torch's dropout, four
elements to a random draw, seeded; the attention path equal to softmax attention with those masks,
and inference through it unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from components.bert.dropout import (ATTENTION, PackedDropout, drop_mask, packed_dropout, packed_dropout_attention,
                                     use_packed_dropout)
from components.bert.model import SeqRecConfig, SeqRecModel


@pytest.mark.parametrize("p", [0.1, 0.2, 0.4])
def test_masks_drop_p_of_the_elements_independently(p):
    torch.manual_seed(0)
    mask = drop_mask(torch.Size([400, 1001]), p)  # not a multiple of 4 elements
    assert mask.shape == (400, 1001) and mask.dtype == torch.bool
    n = mask.numel()
    # Binomial: 5 standard deviations.
    assert abs(mask.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # Each of the four 16-bit slices of a draw is its own decision: neighbours are uncorrelated.
    flat = mask.flatten().float()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01


def test_masks_come_from_the_seeded_generator():
    torch.manual_seed(3)
    a = drop_mask(torch.Size([64, 50]), 0.3)
    torch.manual_seed(3)
    b = drop_mask(torch.Size([64, 50]), 0.3)
    assert torch.equal(a, b) and not torch.equal(a, drop_mask(torch.Size([64, 50]), 0.3))


def test_dropout_keeps_the_expectation_and_its_gradient_is_the_mask():
    x = torch.full((500, 400), 2.0, requires_grad=True)
    torch.manual_seed(1)
    y = packed_dropout(x, 0.25)
    torch.manual_seed(1)
    dropped = drop_mask(x.shape, 0.25)
    assert torch.equal(y == 0, dropped)
    assert torch.allclose(y[~dropped], torch.tensor(2.0 / 0.75))
    assert abs(y.mean().item() - 2.0) < 0.02
    y.sum().backward()
    assert torch.allclose(x.grad, (~dropped).float() / 0.75)


def test_no_dropout_when_evaluating_or_at_zero_and_bad_rates_refused():
    x = torch.randn(8, 5)
    assert packed_dropout(x, 0.3, training=False) is x and packed_dropout(x, 0.0) is x
    # A rate that rounds to 1 would drop nothing and scale by 1 / 0.
    for p in (1.0, 1 - 2**-18):
        with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1 - 2\^-17\), got"):
            packed_dropout(x, p)


def test_attention_is_softmax_attention_with_the_packed_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 4) for _ in range(3))
    mask = torch.zeros(3, 1, 7, 7).masked_fill(torch.rand(3, 1, 7, 7) < 0.3, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    torch.manual_seed(5)
    out, _ = packed_dropout_attention(module, q, k, v, mask, scaling=0.5, dropout=0.2)
    torch.manual_seed(5)
    dropped = drop_mask(torch.Size([3, 2, 7, 7]), 0.2)
    weights = torch.softmax(q @ k.transpose(2, 3) * 0.5 + mask, dim=-1).masked_fill(dropped, 0.0) / 0.8
    assert out.shape == (3, 7, 2, 4)
    assert torch.allclose(out, (weights @ v).transpose(1, 2), atol=1e-5)
    # Without dropout: the fused kernel, the same attention.
    plain, _ = packed_dropout_attention(module.eval(), q, k, v, mask, scaling=0.5, dropout=0.0)
    expected = torch.softmax(q @ k.transpose(2, 3) * 0.5 + mask, dim=-1) @ v
    assert torch.allclose(plain, expected.transpose(1, 2), atol=1e-5)


def _model() -> SeqRecModel:
    torch.manual_seed(0)
    c = SeqRecConfig(n_items=30, mode="id", text_dim=0, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_len=6, dropout=0.2, attention_dropout=0.1)
    return SeqRecModel(c)


def test_switching_an_encoder_changes_training_only():
    plain = _model()
    packed = copy.deepcopy(plain)
    use_packed_dropout(packed.encoder)
    dropouts = [m for m in packed.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is PackedDropout for m in dropouts)
    # Every rate kept where it was: the attention's own (0.1) and the rest (0.2).
    assert sorted({m.p for m in dropouts}) == [0.1, 0.2]
    assert packed.encoder.config._attn_implementation == ATTENTION
    assert packed.state_dict().keys() == plain.state_dict().keys()
    items = torch.tensor([[-1, -1, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    plain.eval(), packed.eval()
    assert torch.allclose(plain.user_vectors(items), packed.user_vectors(items), atol=1e-6)
    packed.train()
    torch.manual_seed(2)
    a = packed.encode(items)
    torch.manual_seed(2)
    assert torch.equal(a, packed.encode(items)) and not torch.allclose(a, packed.encode(items))
    a.sum().backward()
    assert packed.id_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("setting", "compile_setting", "switched"),
                         [(True, False, True), (False, False, False), (True, True, False)])
def test_the_setting_switches_the_module_when_cpu_training_starts(setting, compile_setting, switched, monkeypatch):
    from components.bert.train import build_module
    from components.config import load_params

    params = load_params(overrides=[f"bert.trainer.packed_dropout={str(setting).lower()}",
                                    f"bert.trainer.compile={str(compile_setting).lower()}", "bert.mode=id"])
    c = _model().cfg
    module = build_module(params.bert, params.bert.finetune, "next", c, None, None, np.ones(c.n_items))
    monkeypatch.setattr(module, "compile_encoder", lambda backend="inductor", mode=None: None)
    module.on_fit_start()
    assert (module.model.encoder.config._attn_implementation == ATTENTION) is switched
    assert any(type(m) is PackedDropout for m in module.model.encoder.modules()) is switched
