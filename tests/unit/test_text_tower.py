"""The text tower: fine-tuning the text encoder's top layers with the frozen layers' output
cached once for the catalogue, against the pretrained encoder run in full."""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import pytest
import torch

from components.bert.model import TOWER_CONFIG, SeqRecConfig, SeqRecModel, TextTower, load_model, save_model
from components.bert.text_embeddings import mean_pool
from components.synthetic import ADJECTIVES, THEMES
from tests.bert_helpers import make_tiny_bert

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def texts(n: int = 40) -> list[str]:
    """Texts of different lengths, one longer than MAX_LENGTH tokens (truncated)."""
    words = [w for vocab in THEMES.values() for w in vocab] + list(ADJECTIVES)
    out = [" ".join(words[i : i + 1 + i % 7]) for i in range(n - 1)]
    return out + [" ".join(words[:40])]


def tower(encoder: str, cached: bool = True, layers: int = 1) -> TextTower:
    torch.manual_seed(0)
    items = texts()
    return TextTower(encoder, items, len(items), layers, MAX_LENGTH, cache_frozen=cached)


def reference(t: TextTower, item_ids: torch.Tensor) -> torch.Tensor:
    """The encoder run in full over the padded tokens (no trimming, no cache), mean-pooled."""
    mask = t.token_mask[item_ids]
    with torch.no_grad():
        hidden = t.encoder(input_ids=t.input_ids[item_ids], attention_mask=mask).last_hidden_state
    return mean_pool(hidden, mask)


@pytest.mark.parametrize("cached", [True, False])
def test_the_tower_embeds_items_as_the_whole_encoder_does(encoder, cached):
    t = tower(encoder, cached).eval()
    assert int(t.token_mask.sum(dim=1).max()) == MAX_LENGTH  # the longest text fills the width
    assert int(t.token_mask.sum(dim=1).min()) < MAX_LENGTH // 3
    every = torch.arange(t.input_ids.shape[0])
    short = torch.tensor([0, 7, 3])  # no long text among them: trimmed to their own length
    with torch.no_grad():
        for ids in (every, short):
            assert torch.allclose(t(ids), reference(t, ids), atol=1e-5)
        # In chunks of similar length, each trimmed to its own longest text, returned in order.
        assert torch.allclose(t(every.flip(0), chunk=7), reference(t, every.flip(0)), atol=1e-5)
        # The whole catalogue in two chunk sizes: each size gets its own plan.
        assert torch.allclose(t(None), reference(t, every), atol=1e-5)
        assert torch.allclose(t(None, chunk=7), reference(t, every), atol=1e-5)
    assert [len(t._plan(None, size)[0]) for size in (256, 7)] == [1, 6]


def test_the_frozen_output_is_computed_once_and_only_the_top_layer_trains(encoder, monkeypatch):
    t = tower(encoder, layers=1).train()
    calls = []
    frozen = t._frozen
    monkeypatch.setattr(t, "_frozen", lambda ids, mask: calls.append(ids.shape[0]) or frozen(ids, mask))
    for ids in (torch.arange(40), torch.tensor([5, 1, 5]), torch.arange(40)):
        t(ids).sum().backward()
    assert calls == [40]  # the catalogue once (one chunk), never again
    assert t(torch.tensor([], dtype=torch.long)).shape == (0, t.dim)
    assert t.cache_seconds is not None and not t.frozen_hidden().requires_grad
    top, bottom = t.encoder.encoder.layer[1], t.encoder.encoder.layer[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters())
    assert all(p.grad is None for p in [*bottom.parameters(), *t.encoder.embeddings.parameters()])


def test_training_mode_leaves_the_frozen_layers_without_dropout(encoder):
    """The frozen layers are a fixed feature extractor: the cached and recomputed towers agree
    in training mode too, dropout in the trained layer drawn alike, and every module keeps the
    mode it was given (Lightning warns about modules left in eval mode)."""
    cached, recomputed = tower(encoder, True), tower(encoder, False)
    # Built in training mode, though the pretrained encoder is loaded in eval mode.
    assert all(m.training for t in (cached, recomputed) for m in t.modules())
    ids = torch.tensor([2, 9, 39, 2])
    torch.manual_seed(1)
    a = cached(ids)
    torch.manual_seed(1)
    b = recomputed(ids)
    assert torch.allclose(a, b, atol=1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(a, cached(ids), atol=1e-5), "the trained layer's dropout must still apply"
    assert all(m.training for t in (cached, recomputed) for m in t.modules())


def test_copies_pickles_and_moves_leave_the_cache_behind(encoder):
    t = tower(encoder).eval()
    with torch.no_grad():
        expected = t(None)
    cache = t.frozen_hidden()
    assert cache.shape == (40, MAX_LENGTH, t.dim)
    for copy_ in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert copy_._frozen_hidden is None and t._frozen_hidden is cache
        with torch.no_grad():
            assert torch.allclose(copy_(None), expected, atol=1e-6)
    # Pickled (ddp_spawn hands the module to its workers this way): weights and tokens, not the cache.
    assert len(pickle.dumps(t)) < len(pickle.dumps(t.state_dict())) + cache.nbytes // 2
    t.to(torch.device("cpu"))
    assert t._frozen_hidden is None


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_a_saved_recommender_with_a_tower_reloads_and_embeds_alike(tmp_path, stored):
    """Also where the encoder it was trained from is gone (a checkpoint from another machine).
    fp16: the weights as `benchmarks.gpu export --encoder-weights` stores them, under a config
    without a dtype (as MiniLM's is); the tower and its reloaded copy still run in fp32."""
    from safetensors.torch import load_file, save_file

    items = texts()
    encoder = make_tiny_bert(tmp_path / "encoder")
    if stored == "fp16":
        weights = load_file(str(encoder / "model.safetensors"))
        save_file({k: v.half() for k, v in weights.items()}, str(encoder / "model.safetensors"))
        config = json.loads((encoder / "config.json").read_text())
        (encoder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if "dtype" not in k}))
    cfg = SeqRecConfig(n_items=len(items), mode="text", text_dim=16, hidden_size=16, num_layers=1, num_heads=2,
                       intermediate_size=32, max_len=6, dropout=0.0, text_encoder_path=str(encoder),
                       text_finetune_layers=1, text_max_length=MAX_LENGTH)
    torch.manual_seed(0)
    model = SeqRecModel(cfg, text_features=torch.randn(len(items), 16), texts=items).eval()
    with torch.no_grad():
        expected = model.item_representations()
        some = model.item_representations(torch.tensor([3, 0, 3]))
    assert torch.allclose(some, expected[[3, 0, 3]], atol=1e-6)
    save_model(model, tmp_path / "m")
    shutil.rmtree(encoder)
    shutil.move(tmp_path / "m", tmp_path / "moved")
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["text_encoder_path"] == TOWER_CONFIG
    loaded = load_model(tmp_path / "moved")
    assert {p.dtype for p in [*model.text_tower.parameters(), *loaded.text_tower.parameters()]} == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(loaded.item_representations(), expected, atol=1e-6)
    assert loaded.text_tower.frozen_hidden().shape == (len(items), MAX_LENGTH, 16)


def test_loading_weights_drops_the_cache(encoder):
    t = tower(encoder).eval()
    ids = torch.arange(40)
    with torch.no_grad():
        before = t(ids)
    state = t.state_dict()
    key = "encoder.encoder.layer.0.output.dense.weight"
    state[key] = state[key] + 0.5 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    t.load_state_dict(state)
    with torch.no_grad():
        after = t(ids)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, reference(t, ids), atol=1e-5)
