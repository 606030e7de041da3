"""Pruning, quantization, ONNX export and parity on a tiny hand-built recommender."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.bert.model import GatedOutput, SeqRecConfig, SeqRecModel, left_pad, load_model, save_model
from components.compress import choose, overlap, prune_structured, prune_unstructured, quantize_int8
from components.onnx_graphs import (
    check_sequence_parity,
    export_mf,
    export_sequence,
    sequence_inputs,
    session,
    check_mf_parity,
)


def tiny(**kw) -> SeqRecModel:
    torch.manual_seed(0)
    base = dict(n_items=40, mode="text+id", text_dim=8, hidden_size=16, num_layers=2, num_heads=4,
                intermediate_size=32, max_len=8, dropout=0.0)
    base.update(kw)
    c = SeqRecConfig(**base)
    return SeqRecModel(c, text_features=torch.randn(c.n_items, c.text_dim)).eval()


def histories(n: int, rng_seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    return [rng.integers(0, 40, rng.integers(1, 12)) for _ in range(n)]


def users_of(m: SeqRecModel, hs: list[np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return m.user_vectors(left_pad(hs, m.cfg.max_len))


def test_pruning_units_that_contribute_nothing_changes_nothing():
    m = tiny()
    with torch.no_grad():
        for layer in m.encoder.encoder.layer:
            # Heads 1 and 3 output zeros (their value rows are zero) ...
            size = layer.attention.self.attention_head_size
            for h in (1, 3):
                layer.attention.self.value.weight[h * size : (h + 1) * size] = 0
                layer.attention.self.value.bias[h * size : (h + 1) * size] = 0
            # ... and the second half of the FFN neurons are dead (GELU(0) = 0).
            layer.intermediate.dense.weight[16:] = 0
            layer.intermediate.dense.bias[16:] = 0
    pruned = prune_structured(m, heads_ratio=0.5, ffn_ratio=0.5)
    assert pruned.cfg.layer_heads == [2, 2] and pruned.cfg.layer_intermediate == [16, 16]
    layer = pruned.encoder.encoder.layer[0]
    assert layer.attention.self.query.out_features == 8 and layer.intermediate.dense.out_features == 16
    hs = histories(20)
    assert torch.allclose(users_of(m, hs), users_of(pruned, hs), atol=1e-5)
    # The original is untouched.
    assert m.encoder.encoder.layer[0].attention.self.num_attention_heads == 4


def test_pruning_removes_the_smallest_units_and_keeps_one_head():
    m = tiny()
    pruned = prune_structured(m, heads_ratio=0.9, ffn_ratio=0.25)
    assert pruned.cfg.layer_heads == [1, 1] and pruned.cfg.layer_intermediate == [24, 24]
    before = sum(p.numel() for p in m.encoder.parameters())
    assert sum(p.numel() for p in pruned.encoder.parameters()) < before
    with pytest.raises(ValueError):
        prune_structured(m, heads_ratio=1.0, ffn_ratio=0.0)


def test_pruned_model_saves_and_loads(tmp_path):
    pruned = prune_structured(tiny(), 0.5, 0.5)
    save_model(pruned, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.cfg.layer_heads == [2, 2]
    hs = histories(5)
    assert torch.allclose(users_of(pruned, hs), users_of(back, hs), atol=1e-6)


def test_unstructured_pruning_reaches_the_requested_sparsity():
    m = tiny()
    sparse, report = prune_unstructured(m, 0.6)
    assert report["global_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert set(report["per_matrix"]) and all(0 <= v <= 1 for v in report["per_matrix"].values())
    # Global: matrices are pruned to different degrees, and the original keeps its weights.
    assert len({round(v, 2) for v in report["per_matrix"].values()}) > 1
    assert float((m.encoder.encoder.layer[0].intermediate.dense.weight == 0).float().mean()) == 0.0


def test_choose_int8_only_within_tolerance():
    q = {"onnx_fp32": {"ndcg@10": 0.100}, "onnx_int8": {"ndcg@10": 0.0995}}
    assert choose("auto", q, 0.01)[0] == "onnx_int8"
    q["onnx_int8"]["ndcg@10"] = 0.0985
    variant, reason = choose("auto", q, 0.01)
    assert variant == "onnx_fp32" and "-1.50%" in reason
    assert choose("onnx_int8", q, 0.01)[0] == "onnx_int8"
    with pytest.raises(ValueError, match="not built"):
        choose("pruned_onnx_int8", q, 0.01)


def test_overlap_worked_example():
    assert overlap(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]])) == 0.5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = tiny()
    path = tmp_path_factory.mktemp("onnx") / "sequence.onnx"
    export_sequence(m, path, k=15)
    return m, path


def test_onnx_matches_pytorch_at_several_shapes(exported):
    m, path = exported
    parity = check_sequence_parity(m, path, histories(70), k=15, batch_sizes=(1, 5, 64), lengths=(2, 5, 8))
    assert len(parity["shapes"]) == 9
    assert parity["max_abs_diff"] < 1e-4 and parity["min_top10_identical"] >= 0.99


def test_moe_text_adaptor_exports_and_matches_pytorch(tmp_path):
    """UniSRec's adaptor (einsums over experts) goes through the same export: the sequence
    graph and the item-from-text projection (what cold-start items take) match PyTorch."""
    from components.onnx_graphs import _export

    m = tiny(text_adaptor="moe", text_experts=3)
    with torch.no_grad():  # a gate that is not uniform, centres that are not zero
        m.text_projection.gate.weight.normal_()
        m.text_projection.centre.normal_()
    path = tmp_path / "sequence.onnx"
    export_sequence(m, path, k=15)
    parity = check_sequence_parity(m, path, histories(30), k=15, batch_sizes=(1, 5), lengths=(2, 8))
    assert parity["max_abs_diff"] < 1e-4 and parity["min_top10_identical"] >= 0.99

    class Project(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, text):
            return self.model.project_text(text)

    text = torch.randn(4, 8)
    _export(Project(m), (text,), tmp_path / "text.onnx", ["text"], ["item"],
            {"text": {0: torch.export.Dim("batch", min=1, max=1024)}})
    probe = torch.randn(7, 8)
    (got,) = session(tmp_path / "text.onnx").run(None, {"text": probe.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, m.project_text(probe).numpy(), atol=1e-5)


def test_onnx_excludes_items_and_returns_k(exported):
    m, path = exported
    hs = histories(16, 1)
    feeds = sequence_inputs(hs, m.cfg.max_len, exclude_last=12)
    users, top, scores = session(path).run(None, feeds)
    assert top.shape == (16, 15) and users.shape == (16, 16)
    for row, h in enumerate(hs):
        assert not set(top[row]) & set(h[-12:].tolist())
        assert np.all(np.diff(scores[row]) <= 1e-6)


def test_int8_is_smaller_and_close(exported, tmp_path):
    m, path = exported
    q = tmp_path / "int8.onnx"
    quantize_int8(path, q, per_channel=True)
    assert q.stat().st_size < path.stat().st_size
    feeds = sequence_inputs(histories(64, 2), m.cfg.max_len)
    u32, t32, _ = session(path).run(None, feeds)
    u8, t8, _ = session(q).run(None, feeds)
    cos = (u32 * u8).sum(1) / np.linalg.norm(u32, axis=1) / np.linalg.norm(u8, axis=1)
    assert cos.mean() > 0.98
    assert overlap(t8[:, :10], t32[:, :10]) > 0.7


def test_mf_graph_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(30, 6)).astype(np.float32), rng.normal(size=(50, 6)).astype(np.float32)
    export_mf(users, items, tmp_path / "mf.onnx", k=10)
    assert check_mf_parity(users, items, tmp_path / "mf.onnx", 10)["top10_identical"] == 1.0


def test_static_qdq_and_int8_embedding_table_options(exported, tmp_path):
    from components.compress import quantize_static_qdq

    m, path = exported
    hs = histories(64, 3)
    calibration = [sequence_inputs(hs[i : i + 16], m.cfg.max_len) for i in range(0, 64, 16)]
    static = tmp_path / "static.onnx"
    quantize_static_qdq(path, static, calibration, per_channel=True)
    table = tmp_path / "table.onnx"
    quantize_int8(path, table, per_channel=True, embedding_table=True)
    import onnx

    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(static)).graph.node)
    plain = tmp_path / "plain.onnx"
    quantize_int8(path, plain, per_channel=True)
    # The lookup table stored as INT8 makes the file smaller than quantizing the products only.
    assert table.stat().st_size < plain.stat().st_size
    feeds = sequence_inputs(hs, m.cfg.max_len)
    _, t32, _ = session(path).run(None, feeds)
    for q in (static, table):
        _, tq, _ = session(q).run(None, feeds)
        assert overlap(tq[:, :10], t32[:, :10]) > 0.6


def test_parity_accepts_reordered_ties_but_not_different_items(tmp_path):
    m = tiny()
    with torch.no_grad():  # every item looks the same: all scores tie
        m.id_embedding.weight[:] = m.id_embedding.weight[0]
        m.text_projection.weight.zero_()
    path = tmp_path / "ties.onnx"
    export_sequence(m, path, k=15)
    parity = check_sequence_parity(m, path, histories(20), k=15, batch_sizes=(1, 20), lengths=(8,))
    assert parity["min_top10_identical"] == 1.0
    assert parity["max_abs_diff"] < 1e-4


def test_top10_agreement_worked_example():
    from components.onnx_graphs import top10_agreement

    users = np.array([[1.0, 0.0]], dtype=np.float32)
    items = np.array([[3, 0], [2, 0], [2, 5], [1, 0]], dtype=np.float32)  # scores 3, 2, 2, 1
    torch_top, torch_scores = np.array([[0, 1, 2]]), np.array([[3.0, 2.0, 2.0]])
    exact, tied = top10_agreement(np.array([[0, 2, 1]]), torch_top, users, items, torch_scores, 1e-5)
    assert not exact[0] and tied[0]  # items 1 and 2 tie: either order is correct
    exact, tied = top10_agreement(np.array([[0, 1, 3]]), torch_top, users, items, torch_scores, 1e-5)
    assert not exact[0] and not tied[0]  # item 3 scores 1, not 2: a real mismatch


@pytest.mark.parametrize("positions", ["relative", "absolute+relative"])
def test_relative_positions_export_prune_and_quantize(positions, tmp_path):
    """The relative-position bias travels inside the exported mask: the ONNX graph matches
    PyTorch at several widths, also after structured pruning (the bias is shared by heads, so a
    pruned layer takes the same mask), and INT8 stays close."""
    m = tiny(positions=positions)
    with torch.no_grad():
        m.relative_bias.copy_(torch.randn(m.relative_bias.shape))
    pruned = prune_structured(m, heads_ratio=0.5, ffn_ratio=0.25)
    assert pruned.cfg.positions == positions
    for name, model in (("full", m), ("pruned", pruned)):
        path = tmp_path / f"{name}.onnx"
        export_sequence(model, path, k=15)
        parity = check_sequence_parity(model, path, histories(30), k=15, batch_sizes=(1, 5), lengths=(2, 8))
        assert parity["max_abs_diff"] < 1e-4 and parity["min_top10_identical"] >= 0.99, name
    q = tmp_path / "int8.onnx"
    quantize_int8(tmp_path / "full.onnx", q, per_channel=True)
    feeds = sequence_inputs(histories(64, 2), m.cfg.max_len)
    u32 = session(tmp_path / "full.onnx").run(None, feeds)[0]
    u8 = session(q).run(None, feeds)[0]
    cos = (u32 * u8).sum(1) / np.linalg.norm(u32, axis=1) / np.linalg.norm(u8, axis=1)
    assert cos.mean() > 0.98


def test_gated_residual_exports_and_prunes(tmp_path):
    """Gated sublayer outputs keep BERT's dense layers, so structured pruning shrinks them as
    usual; the full and the pruned model's ONNX graphs match PyTorch."""
    m = tiny(residual="gated")
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, GatedOutput):
                module.gate.weight.normal_()
                module.gate.bias.normal_()
    pruned = prune_structured(m, heads_ratio=0.5, ffn_ratio=0.25)
    assert pruned.cfg.residual == "gated" and pruned.cfg.layer_heads == [2, 2]
    assert isinstance(pruned.encoder.encoder.layer[0].output, GatedOutput)
    for name, model in (("full", m), ("pruned", pruned)):
        path = tmp_path / f"{name}.onnx"
        export_sequence(model, path, k=15)
        parity = check_sequence_parity(model, path, histories(30), k=15, batch_sizes=(1, 5), lengths=(2, 8))
        assert parity["max_abs_diff"] < 1e-4 and parity["min_top10_identical"] >= 0.99, name
    # Unstructured pruning leaves the gates alone: a zero gate weight is an open gate, not a
    # removed connection.
    sparse, report = prune_unstructured(m, 0.6)
    assert report["global_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert not any(".gate" in name for name in report["per_matrix"])
    for before, after in zip(m.modules(), sparse.modules()):
        if isinstance(before, GatedOutput):
            assert torch.equal(before.gate.weight, after.gate.weight)


def test_recovery_trains_on_the_configured_loss(built_modules, monkeypatch, tmp_path):
    """The pruned model's recovery fine-tune builds its module from `loss_settings`, as the
    training stages do (recency weights, sampled softmax and weight decay included)."""
    from components.bert import data
    from components.compress import recover
    from components.config import load_params
    from components.sequences import Sequences
    from tests.conftest import LOSS_OVERRIDES, LOSS_SETTINGS

    rows = [np.arange(u, u + n) % 40 for u, n in enumerate([5, 9, 3, 7])]
    split = np.concatenate([np.r_[np.zeros(len(r) - 1, np.int8), 1] for r in rows])
    items = np.concatenate(rows).astype(np.int32)
    seqs = Sequences(np.r_[0, np.cumsum([len(r) for r in rows])], items, np.arange(items.size),
                     np.ones(items.size, np.float32), split, 40)
    monkeypatch.setattr(data, "load_sequences", lambda folder: seqs)
    params = load_params(overrides=[*LOSS_OVERRIDES, "compress.prune.recovery_epochs=1", "bert.trainer.num_threads=1"])
    recover(tiny(mode="id", text_dim=0), tmp_path, params.compress, params.bert, 0, "valid")
    (module,) = built_modules
    assert {k: module.hparams[k] for k in LOSS_SETTINGS} == LOSS_SETTINGS
