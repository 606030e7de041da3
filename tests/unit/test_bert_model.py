"""The recommender network: masks, positions, losses, save/load, batches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from components.bert.data import ClozeCollate, NextItemCollate
from components.bert.model import MASK, PAD, SeqRecConfig, SeqRecModel, left_pad, load_model, save_model, whitening
from components.bert.module import SeqRecModule
from tests.conftest import LOSS_OVERRIDES, LOSS_SETTINGS


def cfg(**kw) -> SeqRecConfig:
    base = dict(n_items=30, mode="text+id", text_dim=8, hidden_size=16, num_layers=2, num_heads=2,
                intermediate_size=32, max_len=6, dropout=0.0)
    base.update(kw)
    return SeqRecConfig(**base)


def model(**kw) -> SeqRecModel:
    torch.manual_seed(0)
    c = cfg(**kw)
    return SeqRecModel(c, text_features=torch.randn(c.n_items, c.text_dim) if "text" in c.mode else None).eval()


def test_left_pad_keeps_the_most_recent_items():
    out = left_pad([[1, 2], [3, 4, 5, 6, 7, 8, 9], []], 4)
    assert out.tolist() == [[PAD, PAD, 1, 2], [6, 7, 8, 9], [PAD, PAD, PAD, PAD]]


def test_causal_output_ignores_later_items():
    m = model()
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[1, 2, 3, 9, 9, 9]])
    ha, hb = m.encode(a, causal=True), m.encode(b, causal=True)
    assert torch.allclose(ha[:, :3], hb[:, :3], atol=1e-6)
    assert not torch.allclose(ha[:, 3:], hb[:, 3:])
    # Bidirectional attention: early positions see the later items.
    assert not torch.allclose(m.encode(a, causal=False)[:, :3], m.encode(b, causal=False)[:, :3])


def test_padding_does_not_change_the_user_vector():
    m = model()
    short = left_pad([[4, 5, 6]], 6)
    assert short.tolist() == [[PAD, PAD, PAD, 4, 5, 6]]
    # Same history, different padding content can't leak: pads are masked as keys.
    other = short.clone()
    other[0, :3] = MASK
    assert torch.allclose(m.user_vectors(short), m.encode(short, causal=True)[:, -1])
    assert not torch.isnan(m.user_vectors(torch.full((1, 6), PAD))).any()


def test_positions_matter():
    m = model()
    assert not torch.allclose(m.user_vectors(torch.tensor([[1, 2, 3, 4, 5, 6]])),
                              m.user_vectors(torch.tensor([[6, 5, 4, 3, 2, 1]])))


@pytest.mark.parametrize("mode", ["text", "id", "text+id"])
def test_item_representations_by_mode(mode):
    m = model(mode=mode, text_dim=8 if "text" in mode else 0)
    reps = m.item_representations()
    assert reps.shape == (30, 16)
    subset = m.item_representations(torch.tensor([3, 7]))
    assert torch.allclose(subset, reps[[3, 7]], atol=1e-6)
    if mode == "id":
        with pytest.raises(ValueError):
            m.project_text(torch.randn(1, 8))
    else:
        # A text-only representation exists for any text embedding (cold start).
        assert m.project_text(torch.randn(2, 8)).shape == (2, 16)


def test_whitening_decorrelates_to_unit_variance():
    # Anisotropic, correlated rows: a shared offset and one dominant direction, as sentence
    # encoders produce.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g) @ torch.tensor(
        [[3.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.4, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.3]]
    ) + 7.0
    mean, w = whitening(x)
    z = (x - mean) @ w
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-4)
    # Decorrelated; unit variance up to the regularisation (eps is 0.05% of the mean variance).
    assert torch.allclose(torch.cov(z.T), torch.eye(4), atol=2e-2)


def test_whitening_keeps_null_directions_finite():
    # Fewer items than dimensions: a singular covariance must not blow up.
    x = torch.randn(3, 8)
    mean, w = whitening(x)
    z = (x - mean) @ w
    assert torch.isfinite(w).all() and torch.isfinite(z).all()


def test_whitened_text_projection_is_saved_with_the_weights(tmp_path):
    m = model(text_whitening=True)
    text = m.text_features
    mean, w = whitening(text)
    assert torch.allclose(m.project_text(text[:2]), m.text_projection((text[:2] - mean) @ w), atol=1e-5)
    # Items and new texts go through the same transform.
    id_part = m.id_embedding.weight[:2]
    assert torch.allclose(m.item_representations(torch.tensor([0, 1])), m.project_text(text[:2]) + id_part, atol=1e-5)
    save_model(m, tmp_path)
    back = load_model(tmp_path)
    probe = torch.randn(3, 8)
    assert torch.allclose(back.project_text(probe), m.project_text(probe), atol=1e-6)
    # A model without whitening has no such buffers: its checkpoints stay as they were.
    assert "text_whitener" not in model().state_dict()


def test_cloze_inference_reads_an_appended_mask():
    m = model(inference="cloze")
    hist = torch.tensor([[1, 2, 3, 4, 5, 6]])
    expected = m.encode(torch.tensor([[2, 3, 4, 5, 6, MASK]]), causal=False)[:, -1]
    assert torch.allclose(m.user_vectors(hist), expected)


def test_save_and_load_roundtrip(tmp_path):
    m = model()
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    hist = torch.tensor([[PAD, 1, 2, 3, 4, 5]])
    assert back.cfg == m.cfg
    assert torch.allclose(back.user_vectors(hist), m.user_vectors(hist))
    assert torch.allclose(back.item_representations(), m.item_representations())


def test_configs_saved_before_positions_and_gates_load_as_bert(tmp_path):
    """A model saved before `positions` and `residual` existed has neither in its config.json:
    it loads with BERT's absolute positions and plain residuals, its weights unchanged."""
    import json

    m = model()
    save_model(m, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("positions", "residual"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = load_model(tmp_path)
    assert (back.cfg.positions, back.cfg.residual) == ("absolute", "plain")
    hist = torch.tensor([[PAD, 1, 2, 3, 4, 5]])
    assert torch.allclose(back.user_vectors(hist), m.user_vectors(hist), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        cfg(mode="image")
    with pytest.raises(ValueError, match="divisible"):
        cfg(hidden_size=15)
    with pytest.raises(ValueError, match="text_dim"):
        cfg(mode="text", text_dim=0)


def test_next_item_collate_shifts_by_one():
    x, y, _ = NextItemCollate(4)([np.array([1, 2, 3]), np.array([5, 6, 7, 8, 9, 10])])
    assert x.tolist() == [[PAD, PAD, 1, 2], [6, 7, 8, 9]]
    assert y.tolist() == [[PAD, PAD, 2, 3], [7, 8, 9, 10]]


def test_cloze_collate_masks_at_least_one_position():
    torch.manual_seed(0)
    x, y, _ = ClozeCollate(5, mask_prob=0.0)([np.array([1, 2, 3])])
    assert x.tolist() == [[PAD, PAD, 1, 2, MASK]] and y.tolist() == [[PAD, PAD, PAD, PAD, 3]]
    x, y, _ = ClozeCollate(5, mask_prob=1.0)([np.array([1, 2, 3])])
    assert x.tolist() == [[PAD, PAD, MASK, MASK, MASK]] and y.tolist() == [[PAD, PAD, 1, 2, 3]]


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_losses_train_a_memorisable_sequence(loss):
    """Both losses can fit 'after item k comes item k+1' on a tiny catalogue."""
    torch.manual_seed(0)
    c = cfg(mode="id", text_dim=0, dropout=0.0)
    module = SeqRecModule(
        {**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0,
        loss=loss, num_negatives=10, negative_sampling="popularity", item_counts=np.arange(30) + 1,
    )
    seqs = [np.arange(s, s + 7) % 30 for s in range(30)]
    x, y, _ = NextItemCollate(6)(seqs)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        value = module._loss(x, y)
        first = first if first is not None else value.item()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.3 * first
    module.eval()
    with torch.no_grad():
        users = module.model.user_vectors(left_pad([[3, 4, 5]], 6))
        assert module.model.scores(users).argmax().item() == 6


def _per_target_losses(module: SeqRecModule, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's cross-entropy the long way, with its place from the end of its sequence."""
    m = module.model
    table = m.item_representations()
    hidden = m.output_users(m.encode(x, table, causal=True))
    real = y != PAD
    logits = hidden[real] @ m.output_items(table).T
    places = (y.shape[1] - 1 - torch.arange(y.shape[1])).expand_as(y)[real]
    return torch.nn.functional.cross_entropy(logits, y[real], reduction="none"), places


def test_recency_weights_each_target_by_its_place_from_the_end():
    """Half-life 1, boost 3: the last target counts 4, the one before 2.5, then 1.75, ...; the
    loss is the weighted mean. Boost 0 is the plain mean."""
    c = cfg(mode="id", text_dim=0)
    x, y, positions = NextItemCollate(6)([np.array([1, 2, 3, 4]), np.arange(10, 20), np.array([7, 8])])
    plain = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0).eval()
    weighted = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0,
                            recency_half_life=1.0, recency_boost=3.0).eval()
    weighted.model.load_state_dict(plain.model.state_dict())
    none = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0,
                        recency_half_life=1.0, recency_boost=0.0).eval()
    none.model.load_state_dict(plain.model.state_dict())
    with torch.no_grad():
        losses, places = _per_target_losses(plain, x, y)
        w = 1.0 + 3.0 * 0.5 ** places.float()
        assert sorted(set(w.tolist()), reverse=True)[:3] == [4.0, 2.5, 1.75]
        assert torch.isclose(weighted._loss(x, y, positions), (w * losses).sum() / w.sum(), atol=1e-6)
        assert torch.isclose(none._loss(x, y, positions), losses.mean(), atol=1e-6)
        assert not torch.isclose(weighted._loss(x, y, positions), losses.mean(), atol=1e-4)
        # Bucketed batches: the summed weighted loss over the average batch's total weight.
        seqs = [np.array([1, 2, 3, 4]), np.array([7, 8])]  # 3 and 1 targets
        weighted._trainer = SimpleNamespace(datamodule=SimpleNamespace(positions_per_batch=2.0, train_sequences=seqs))
        weighted.on_fit_start()
        mean_w = (4.0 + 2.5 + 1.75 + 4.0) / 4
        assert weighted.loss_normaliser == pytest.approx(2.0 * mean_w)
        assert torch.isclose(weighted._loss(x, y, positions), (w * losses).sum() / (2.0 * mean_w), atol=1e-6)


@pytest.mark.parametrize("objective,loss", [("next", "sampled"), ("cloze", "full"), ("cloze", "sampled")])
def test_recency_weights_masked_and_sampled_targets_alike(monkeypatch, objective, loss):
    """The weighting holds for the cloze objective's masked positions and for the sampled
    softmax: each target's own loss (read off the unweighted module, with the same masks and
    negatives) times 1 + boost * 0.5^(later items / half-life), over the weights' sum."""
    from components.bert.data import ClozeCollate

    c = cfg(mode="id", text_dim=0)
    seqs = [np.array([1, 2, 3, 4]), np.arange(10, 20), np.array([7, 8, 9])]
    torch.manual_seed(3)
    x, y, positions = (NextItemCollate(6) if objective == "next" else ClozeCollate(6, 0.6))(seqs)
    kw = dict(objective=objective, lr=0.01, weight_decay=0.0, warmup_fraction=0.0, loss=loss, num_negatives=8)
    plain = SeqRecModule({**c.__dict__}, **kw).eval()
    with torch.no_grad():  # spread the targets' losses apart, so a wrong weighting shows
        plain.model.id_embedding.weight.mul_(20.0)
    weighted = SeqRecModule({**c.__dict__}, **kw, recency_half_life=2.0, recency_boost=3.0).eval()
    weighted.model.load_state_dict(plain.model.state_dict())
    per_target = []

    def record(logits, targets, weights=None):
        assert weights is None
        per_target.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
        return per_target[-1].mean()

    monkeypatch.setattr(plain, "_cross_entropy", record)
    with torch.no_grad():
        torch.manual_seed(7)
        plain._loss(x, y, positions)
        torch.manual_seed(7)
        value = weighted._loss(x, y, positions)
    (losses,) = per_target
    later = (y.shape[1] - 1 - torch.arange(y.shape[1])).expand_as(y)[y != PAD].float()
    assert losses.numel() == later.numel() and len(set(later.tolist())) > 2
    w = 1.0 + 3.0 * 0.5 ** (later / 2.0)
    assert torch.isclose(value, (w * losses).sum() / w.sum(), atol=1e-6)
    assert not torch.isclose(value, losses.mean(), atol=1e-4)


def test_every_trainer_takes_the_loss_from_one_place(built_modules):
    """`loss_settings` carries every loss setting `SeqRecModule` has (a new one left out of it
    fails here); the training stages build their module from it, as the pruned model's recovery
    and the incremental update do (tests/unit/test_compress.py, test_incremental.py)."""
    import inspect

    from components.bert.train import build_module, loss_settings, model_config
    from components.config import load_params

    other = {"self", "model_cfg", "objective", "lr", "warmup_fraction", "item_counts", "text_features", "texts"}
    module_settings = set(inspect.signature(SeqRecModule.__init__).parameters) - other
    bert = load_params(overrides=[*LOSS_OVERRIDES, "bert.mode=id", "bert.hidden_size=16", "bert.num_layers=1",
                                  "bert.intermediate_size=32"]).bert
    assert loss_settings(bert) == LOSS_SETTINGS
    assert set(LOSS_SETTINGS) == module_settings
    for stage, objective in ((bert.pretrain, "cloze"), (bert.finetune, "next")):
        build_module(bert, stage, objective, model_config(bert, 30, 0, inference="causal"), None, None, np.ones(30))
    assert [{k: m.hparams[k] for k in LOSS_SETTINGS} for m in built_modules] == [LOSS_SETTINGS] * 2


def test_sampled_loss_applies_log_q_and_masks_accidental_hits():
    torch.manual_seed(0)
    c = cfg(mode="id", text_dim=0, n_items=5)
    module = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0,
                          loss="sampled", num_negatives=50, negative_sampling="uniform")
    with torch.no_grad():
        module.model.id_embedding.weight.zero_()
        module.model.special.weight.zero_()
    x, y, _ = NextItemCollate(6)([np.array([0, 1, 2])])
    # All scores equal and Q uniform: the loss is log(1 + #negatives that are not the positive).
    value = module._loss(x, y).item()
    assert np.isfinite(value)
    assert value < np.log(51) + 1e-4


def test_moe_adaptor_mixes_parametric_whitening_experts_by_its_gate(tmp_path):
    """Each expert is (x - b_g) W_g; the output is their softmax(x G)-weighted sum (computed
    here the long way); a zero gate starts as the experts' average; one expert with a zero
    centre is a linear map without bias. The model saves and loads with it."""
    from components.bert.model import MoEAdaptor

    torch.manual_seed(0)
    a = MoEAdaptor(8, 5, experts=3, dropout=0.0)
    x = torch.randn(6, 8)
    with torch.no_grad():
        views = torch.stack([(x - a.centre[g]) @ a.weight[g] for g in range(3)], dim=1)
        assert torch.allclose(a(x), views.mean(dim=1), atol=1e-5)  # zero gate
        a.gate.weight.normal_()
        a.centre.normal_()
        views = torch.stack([(x - a.centre[g]) @ a.weight[g] for g in range(3)], dim=1)
        weights = torch.softmax(x @ a.gate.weight.T, dim=1)
        assert torch.allclose(a(x), (weights[:, :, None] * views).sum(1), atol=1e-5)
        one = MoEAdaptor(8, 5, experts=1, dropout=0.0)
        assert torch.allclose(one(x), x @ one.weight[0], atol=1e-5)

    m = model(mode="text+id", text_adaptor="moe", text_experts=4)
    assert isinstance(m.text_projection, MoEAdaptor)
    with torch.no_grad():
        m.text_projection.centre.normal_()
    save_model(m, tmp_path)
    back = load_model(tmp_path)
    probe = torch.randn(3, m.cfg.text_dim)
    with torch.no_grad():
        assert torch.allclose(back.project_text(probe), m.project_text(probe), atol=1e-6)
    with pytest.raises(ValueError, match="text_adaptor"):
        cfg(text_adaptor="mlp")


def test_bert_loss_settings_are_checked_by_name():
    from components.config import ParamsError, load_params

    with pytest.raises(ParamsError, match="bert.num_negatives must be at least 1"):
        load_params(overrides=["bert.loss=sampled", "bert.num_negatives=0"])
    with pytest.raises(ParamsError, match="bert.loss"):
        load_params(overrides=["bert.loss=bpr"])
    with pytest.raises(ParamsError, match="bert.text_experts must be at least 1"):
        load_params(overrides=["bert.text_adaptor=moe", "bert.text_experts=0"])
    assert load_params(overrides=["bert.text_adaptor=moe"]).bert.text_adaptor == "moe"
    with pytest.raises(ParamsError, match="bert.recency_half_life and bert.recency_boost must be >= 0"):
        load_params(overrides=["bert.recency_half_life=2", "bert.recency_boost=-1"])
    with pytest.raises(ParamsError, match="bert.pretrain.enabled and bert.finetune.enabled are both false"):
        load_params(overrides=["bert.pretrain.enabled=false", "bert.finetune.enabled=false"])


def test_padding_length_does_not_change_the_user_vector():
    """Right-aligned positions: the same history padded to 6 or to 3 gives the same vector."""
    m = model()
    full = m.user_vectors(left_pad([[4, 5, 6]], 6))
    short = m.user_vectors(left_pad([[4, 5, 6]], 3))
    assert torch.allclose(full, short, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds max_len"):
        m.user_vectors(left_pad([[1] * 7], 7))


def test_epoch_log_keeps_only_checkpointed_epochs_on_resume(tmp_path):
    """The log travels in the checkpoint: a resumed run rewrites the file from it, so rows the
    checkpoint does not hold, a row torn by the kill, and a file deleted in between (DVC removes
    a stage's outputs before running it) all come out right."""
    import csv
    from types import SimpleNamespace

    from components.bert.train import EpochLog

    path = tmp_path / "metrics.csv"
    log = EpochLog(path, "finetune", 10)
    log.rows = [["finetune", epoch, 1.0, 0.1, 0.2, 1e-3, 2.0, 5.0] for epoch in range(1, 6)]
    state = log.state_dict()  # what a checkpoint stores
    with path.open("a", newline="") as f:
        f.write("finetune,6,0.9")  # cut short by the kill
    for damage in ("torn", "deleted"):
        if damage == "deleted":
            path.unlink()
        resumed = EpochLog(path, "finetune", 10)
        resumed.load_state_dict(state)
        # Resumed from a checkpoint holding 3 epochs: rows 4-5 and the torn row go.
        resumed.on_train_epoch_start(SimpleNamespace(current_epoch=3, is_global_zero=True), None)
        rows = list(csv.DictReader(path.open()))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3], damage
        assert log.FIELDS == list(rows[0])


def _naive_left_pad(histories, max_len):
    out = torch.full((len(histories), max_len), PAD, dtype=torch.long)
    for row, seq in enumerate(histories):
        seq = list(seq)[-max_len:]
        if seq:
            out[row, max_len - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
    return out


def test_left_pad_matches_the_row_by_row_definition():
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 50, size=n) for n in (0, 1, 5, 9, 30)] + [[3, 4], []]
    for max_len in (1, 4, 9, 12):
        assert torch.equal(left_pad(histories, max_len), _naive_left_pad(histories, max_len))
    assert left_pad([], 5).shape == (0, 5)


def test_padded_length_leaves_room_for_a_mask_in_multiples_of_eight():
    from components.bert.model import padded_length

    assert padded_length([[1, 2, 3]], 200) == 8
    assert padded_length([list(range(7))], 200) == 8
    assert padded_length([list(range(8))], 200) == 16  # the extra column a cloze MASK needs
    assert padded_length([list(range(300))], 200) == 200
    assert padded_length([[1]], 6) == 6  # capped at max_len
    assert padded_length([], 50) == 8


def test_batches_are_padded_to_their_longest_history_and_encode_as_at_max_len():
    seqs = [np.arange(1, 5), np.arange(2, 12)]
    x, y, _ = NextItemCollate(40)(seqs)
    assert x.shape == y.shape == (2, 16)
    assert ClozeCollate(40, 0.5)(seqs)[0].shape == (2, 16)
    for inference in ("causal", "cloze"):
        m = model(max_len=40, inference=inference)
        histories = [list(range(1, 9)), [4, 5]]  # the longest fills a multiple of 8 exactly
        from components.bert.model import padded_length

        narrow = m.user_vectors(left_pad(histories, padded_length(histories, 40)))
        assert torch.allclose(narrow, m.user_vectors(left_pad(histories, 40)), atol=1e-5), inference


def test_validation_ranks_in_fp32_under_bf16_autocast():
    c = cfg(mode="id", text_dim=0)
    module = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0)
    table = module.model.item_representations()
    users = torch.randn(3, c.hidden_size) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = module.ranking_scores(users, table)
        rounded = users @ table.T  # what autocast alone would give
    assert scores.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.allclose(scores, users @ table.T)


def test_text_encoder_device_is_checked():
    from components.bert.text_embeddings import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            resolve_device("cuda")


def test_gradients_are_clipped_by_norm_outside_fp16_scaling():
    """The module clips itself (a fused optimizer under bf16 is refused by Lightning's plugin)."""
    c = cfg(mode="id", text_dim=0)
    module = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0)
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    optimizer = torch.optim.AdamW(module.parameters())
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-4)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=None)  # no clipping asked: unchanged
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()])) \
        == pytest.approx(1.0, rel=1e-4)


def _next_item_batch(batch: int, width: int, n_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, n_items, (batch, width), generator=g)
    items[:, : width // 3] = PAD
    targets = torch.roll(items, -1, dims=1)
    targets[:, -1] = PAD
    targets[items == PAD] = PAD
    return items, targets


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_compiled_encoder_trains_as_the_eager_one_at_every_batch_width(loss):
    """One graph for several widths and batch sizes (dynamic shapes), with the eager module's
    loss and gradients; aot_eager traces exactly what inductor compiles, without its codegen."""
    # hidden 12: a width equal to a dimension of the item table would share its symbol (duck
    # sizing) and cost one recompilation when the width changes.
    c = cfg(mode="id", text_dim=0, max_len=24, hidden_size=12)
    torch.manual_seed(0)
    module = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0,
                          loss=loss, num_negatives=8)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module.compile_encoder(backend="aot_eager")
    compiled = module._compiled_encode
    for i, (batch, width) in enumerate([(6, 16), (3, 8), (6, 24)]):
        items, targets = _next_item_batch(batch, width, c.n_items, seed=i)
        grads = []
        for encode in (compiled, None):
            module._compiled_encode = encode
            module.zero_grad()
            torch.manual_seed(i)  # the same negatives for both
            value = module._loss(items, targets)
            value.backward()
            grads.append((value.item(), [p.grad.clone() for p in module.model.parameters() if p.grad is not None]))
        (compiled_loss, compiled_grads), (eager_loss, eager_grads) = grads
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        assert len(compiled_grads) == len(eager_grads) > 0
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled_grads, eager_grads))
    # One compiled graph served every shape: no recompilation per width.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize(("setting", "mode"), [(False, "default"), (True, "default"), (True, "reduce-overhead")])
def test_compile_settings_reach_the_module_and_compile_when_training_starts(setting, mode, monkeypatch):
    """`build_module` hands `bert.trainer.compile` / `compile_mode` over; fit start compiles."""
    from components.bert.train import build_module
    from components.config import load_params

    params = load_params(overrides=[f"bert.trainer.compile={str(setting).lower()}",
                                    f"bert.trainer.compile_mode={mode}", "bert.mode=id"])
    c = cfg(mode="id", text_dim=0)
    module = build_module(params.bert, params.bert.finetune, "next", c, None, None, np.ones(c.n_items))
    assert (module.compile_setting, module.compile_mode) == (setting, mode)
    calls = []
    monkeypatch.setattr(module, "compile_encoder", lambda backend="inductor", mode=None: calls.append(mode))
    module.on_fit_start()
    assert calls == ([mode] if setting else [])


def test_target_positions_come_with_the_batch_and_give_the_masked_loss():
    """Training batches carry their target positions (no boolean indexing on the device); the
    loss over them equals the loss over the boolean-masked positions."""
    c = cfg(mode="id", text_dim=0, max_len=10)
    torch.manual_seed(0)
    module = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0)
    seqs = [np.array([3, 4, 5, 6]), np.arange(1, 12), np.array([7, 8])]
    for collate in (NextItemCollate(10), ClozeCollate(10, mask_prob=0.5)):
        items, targets, positions = collate(seqs)
        assert positions.tolist() == torch.nonzero((targets != PAD).flatten()).flatten().tolist()
    items, targets, positions = NextItemCollate(10)(seqs)
    hidden = module.model.encode(items, causal=True)
    table = module.model.item_representations()
    expected = torch.nn.functional.cross_entropy(hidden[targets != PAD] @ table.T, targets[targets != PAD])
    assert module._loss(items, targets, positions).item() == pytest.approx(expected.item(), rel=1e-6)
    assert module._loss(items, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_length_buckets_batch_similar_lengths_and_reshuffle_every_epoch():
    from torch.utils.data import DataLoader

    from components.bert.data import LengthBucketSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 200, size=1000)
    sampler = LengthBucketSampler(lengths, batch_size=32, pool_batches=4)
    first = list(sampler)
    assert sorted(first) == list(range(1000))  # every sequence once
    batches = [b.tolist() for b in DataLoader(range(1000), batch_size=32, sampler=sampler)]
    assert sum(len(b) for b in batches) == 1000 and all(len(b) == 32 for b in batches[:-1])
    # Each batch is a run of one pool sorted by length: its widest member sets its padding.
    bucketed = sum(len(b) * lengths[b].max() for b in batches)
    plain = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(1000), 32))
    assert bucketed < 0.7 * plain
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in batches)
    assert list(sampler) != first  # a new order every epoch
    # Seeded from torch's generator when built, then its own: two ranks built alike draw the same
    # orders whatever else they take from the global generator meanwhile (dropout, cloze masks).
    torch.manual_seed(0)
    rank0 = LengthBucketSampler(lengths, batch_size=32, pool_batches=4)
    torch.manual_seed(0)
    rank1 = LengthBucketSampler(lengths, batch_size=32, pool_batches=4)
    for epoch in range(3):
        torch.rand(epoch * 7 + 1)  # each rank's training used the global generator differently
        order0 = list(rank0)
        torch.rand(epoch * 3 + 5)
        assert list(rank1) == order0
    with pytest.raises(ValueError):
        LengthBucketSampler(lengths, batch_size=0, pool_batches=4)


def test_attention_dropout_is_its_own_setting():
    from components.bert.model import bert_config

    assert bert_config(cfg(dropout=0.3)).attention_probs_dropout_prob == 0.3  # None: as saved before the split
    separate = bert_config(cfg(dropout=0.3, attention_dropout=0.0))
    assert separate.attention_probs_dropout_prob == 0.0 and separate.hidden_dropout_prob == 0.3
    # A saved model keeps its setting.
    m = SeqRecModel(cfg(attention_dropout=0.1), text_features=torch.randn(30, 8))
    assert m.encoder.config.attention_probs_dropout_prob == 0.1


def test_bucketed_batches_weigh_every_target_position_alike(monkeypatch, tmp_path):
    """With length buckets, a batch's summed loss is divided by the epoch's average positions per
    batch (not by its own), so a position of a short history weighs what one of a long history
    does, as in a random batch on average."""
    from components.bert import data
    from components.sequences import Sequences

    lengths = [3, 12, 5, 9, 2, 11, 4]  # training items per user (the last one of each is valid)
    rows = [np.arange(1, n + 2) % 29 for n in lengths]
    split = np.concatenate([np.r_[np.zeros(n, np.int8), 1] for n in lengths])
    items = np.concatenate(rows).astype(np.int32)
    seqs = Sequences(np.r_[0, np.cumsum([len(r) for r in rows])], items, np.arange(items.size),
                     np.ones(items.size, np.float32), split, 30)
    monkeypatch.setattr(data, "load_sequences", lambda folder: seqs)
    plain = data.SequenceDataModule(tmp_path, max_len=8, batch_size=3, objective="next", validate=False)
    plain.setup()
    assert plain.positions_per_batch is None
    bucketed = data.SequenceDataModule(tmp_path, max_len=8, batch_size=3, objective="next", validate=False,
                                       bucket_batches=2)
    bucketed.setup()
    # Each kept sequence (its last max_len + 1 items) has one target per item after its first,
    # over ceil(7 / 3) = 3 batches.
    assert bucketed.positions_per_batch == pytest.approx(sum(min(n, 9) - 1 for n in lengths) / 3)

    c = cfg(mode="id", text_dim=0, max_len=8)
    torch.manual_seed(0)
    module = SeqRecModule({**c.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0)
    module.eval()
    items_, targets, positions = NextItemCollate(8)(bucketed.train_sequences[:2])
    # Fit start reads the scale off the trainer's data module: none for plain batches.
    module._trainer = SimpleNamespace(datamodule=plain)
    module.on_fit_start()
    assert module.loss_normaliser is None
    mean = module._loss(items_, targets, positions)
    module._trainer = SimpleNamespace(datamodule=bucketed)
    module.on_fit_start()
    assert module.loss_normaliser == bucketed.positions_per_batch
    assert module._loss(items_, targets, positions).item() == pytest.approx(
        mean.item() * positions.numel() / bucketed.positions_per_batch, rel=1e-6)


def assert_reloads(m: SeqRecModel, folder, hist: torch.Tensor, **settings) -> None:
    """`m` saved and loaded: the same settings, the same user vectors."""
    save_model(m, folder)
    back = load_model(folder)
    assert all(getattr(back.cfg, k) == v for k, v in settings.items())
    assert torch.allclose(back.user_vectors(hist), m.user_vectors(hist), atol=1e-6)


def backward_once(m: SeqRecModel) -> SeqRecModule:
    """A training module around `m`'s settings after one next-item loss's backward."""
    module = SeqRecModule(
        {**m.cfg.__dict__}, objective="next", lr=0.01, weight_decay=0.0, warmup_fraction=0.0,
        loss="full", num_negatives=10, negative_sampling="popularity", item_counts=np.arange(30) + 1,
    )
    x, y, _ = NextItemCollate(6)([np.arange(s, s + 7) % 30 for s in range(8)])
    module._loss(x, y).backward()
    return module


def test_relative_positions_are_a_learned_bias_by_distance_in_the_mask(tmp_path):
    """`positions: absolute+relative` starts as the absolute model (a zero bias) and adds, to
    every attention logit (i, j) the mask allows, the learned bias of distance j - i;
    `relative` alone zeroes and freezes BERT's position table. The bias trains, and saves and
    loads with the weights."""
    hist = torch.tensor([[PAD, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    absolute, both = model(), model(positions="absolute+relative")
    assert "relative_bias" not in absolute.state_dict()
    assert torch.allclose(absolute.user_vectors(hist), both.user_vectors(hist), atol=1e-6)

    with torch.no_grad():
        both.relative_bias.copy_(torch.linspace(-1.0, 1.0, 11))
    valid = hist != PAD
    for causal in (True, False):  # the bidirectional (cloze) mask reads the positive distances
        mask = both.attention_mask(valid, causal, torch.float32, both.relative_logits(6, hist.device))
        for i in range(6):
            for j in range(6):
                allowed = i == j or ((j <= i or not causal) and bool(valid[0, j]))
                expected = both.relative_bias[j - i + 5].item() if allowed else torch.finfo(torch.float32).min
                assert mask[0, 0, i, j].item() == pytest.approx(expected), (causal, i, j)
    assert not torch.allclose(absolute.user_vectors(hist), both.user_vectors(hist), atol=1e-4)
    # Right-aligned, a distance is the same in a batch of any width: padding changes nothing.
    wide = torch.cat([torch.full((2, 2), PAD), hist[:, 2:]], dim=1)
    assert torch.allclose(both.user_vectors(wide), both.user_vectors(hist[:, 2:]), atol=1e-5)
    cloze = model(positions="absolute+relative", inference="cloze")
    with torch.no_grad():
        cloze.relative_bias.copy_(torch.linspace(-1.0, 1.0, 11))
    # (A cloze model drops the oldest column for its MASK: one pad left keeps every item.)
    assert torch.allclose(cloze.user_vectors(wide), cloze.user_vectors(wide[:, 1:]), atol=1e-5)

    relative = model(positions="relative")
    table = relative.encoder.embeddings.position_embeddings.weight
    assert not table.requires_grad and not table.any()
    module = backward_once(relative)
    assert module.model.relative_bias.grad.abs().sum() > 0
    assert module.model.encoder.embeddings.position_embeddings.weight.grad is None

    assert_reloads(both, tmp_path, hist, positions="absolute+relative")
    with pytest.raises(ValueError, match="positions"):
        cfg(positions="rotary")


def test_gated_residual_starts_as_bert_and_learns_its_gates(tmp_path):
    """`residual: gated` wraps each sublayer's output as LayerNorm(x + 2 sigmoid(x W + b) f):
    with BERT's weights and a zero gate it computes what BERT does; a gate that closes takes
    the update out; the gates train, and save and load with the weights."""
    from components.bert.model import GatedOutput

    hist = torch.tensor([[PAD, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    plain, gated = model(), model(residual="gated")
    outputs = [m for m in gated.modules() if isinstance(m, GatedOutput)]
    assert len(outputs) == 2 * gated.cfg.num_layers
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".gate." in k for k in missing)
    assert torch.allclose(plain.user_vectors(hist), gated.user_vectors(hist), atol=1e-6)

    layer = gated.encoder.encoder.layer[0].attention.output
    x, f = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        layer.gate.bias.fill_(-30.0)  # closed: the residual alone
        assert torch.allclose(layer(f, x), layer.LayerNorm(x), atol=1e-5)
        layer.gate.bias.zero_()
        layer.gate.weight.normal_()
        expected = layer.LayerNorm(x + 2 * torch.sigmoid(x @ layer.gate.weight.T) * layer.dense(f))
        assert torch.allclose(layer(f, x), expected, atol=1e-5)
    assert not torch.allclose(plain.user_vectors(hist), gated.user_vectors(hist), atol=1e-4)

    module = backward_once(gated)
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in module.model.modules() if isinstance(m, GatedOutput))

    assert_reloads(gated, tmp_path, hist, residual="gated")
    with pytest.raises(ValueError, match="residual"):
        cfg(residual="highway")
