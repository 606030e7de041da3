"""The recommender network: item representations, a BERT encoder over the user's recent items,
and scores as dot products with every item (the output layer is the item table: tied weights).

Item representation (mode by `bert.mode`):
    text     proj(text_embedding[i])           works for items never seen in training
    id       id_embedding[i]
    text+id  proj(text_embedding[i]) + id_embedding[i]
With `text_whitening`, proj reads the PCA-whitened embedding (x - mean) W, mean and W fixed
buffers computed once from the catalogue's text embeddings and saved with the weights, so new
items from text go through the same transform. proj is one linear layer (`text_adaptor:
linear`) or UniSRec's mixture of parametric-whitening experts (`moe`, `MoEAdaptor`).

The text embeddings are the pretrained encoder's mean-pooled vectors (frozen), or, when the top
layers of the text encoder are fine-tuned, computed on the fly by `TextTower`.

User representation: the item representations of the user's last `max_len` items (left-padded,
so the most recent item is always at the last position) plus learned positions go through a
`transformers.BertModel` built from a `BertConfig`. Positions (`bert.positions`) are BERT's
absolute embeddings, a learned attention bias by relative distance carried in the attention
mask (so export and serving need nothing new), or both. Attention is causal for next-item training
(every position predicts the next item, as in SASRec) and bidirectional for cloze pre-training
(masked positions predict their item, as in BERT4Rec). The user vector is the output at the
last position. The attention mask is built here as an explicit 4-D additive mask, so the same
weights run either way and the exported graph holds no data-dependent mask logic.

`SeqRecConfig` is saved as JSON beside the weights: export and serving rebuild the network from
it without the training configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PAD = -1  # padding position in an item-index tensor
MASK = -2  # masked position (cloze pre-training)
MODES = ("text", "id", "text+id")
POSITIONS = ("absolute", "relative", "absolute+relative")
RESIDUALS = ("plain", "gated")


@dataclass(frozen=True)
class SeqRecConfig:
    n_items: int
    mode: str
    text_dim: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_len: int
    dropout: float
    # How a user vector is read: "causal" (output at the last item, next-item fine-tuned) or
    # "cloze" (bidirectional output at a MASK appended after the history, pre-trained only).
    inference: str = "causal"
    # Scores: "dot" (u . v) or "cosine" (u . v / (|u| |v| temperature)). Cosine is applied by
    # normalising the outputs, so scores stay dot products of the returned vectors.
    similarity: str = "dot"
    temperature: float = 1.0
    text_whitening: bool = False
    # The text projection: "linear" or "moe" (`MoEAdaptor` with `text_experts` experts).
    text_adaptor: str = "linear"
    text_experts: int = 8
    # Text tower (only when the text encoder's top layers are fine-tuned): where it came from and
    # how many of its layers train.
    text_encoder_path: str | None = None
    text_finetune_layers: int = 0
    text_max_length: int = 64
    # Compute the frozen layers' output once for the catalogue (`TextTower`), not every step.
    text_cache_frozen: bool = True
    # Structured pruning: attention heads and FFN width of each encoder layer when they differ
    # from num_heads / intermediate_size (None = unpruned).
    layer_heads: list[int] | None = None
    layer_intermediate: list[int] | None = None
    # Dropout on the attention weights (None: `dropout`, as models saved before it was separate).
    attention_dropout: float | None = None
    # Where order enters: "absolute" (BERT's learned position embeddings, right-aligned),
    # "relative" (a learned attention bias by distance j - i instead) or both.
    positions: str = "absolute"
    # Each sublayer's residual: "plain" (BERT: LayerNorm(x + f)) or "gated" (LayerNorm(x + g(x) f),
    # `GatedOutput`).
    residual: str = "plain"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if "text" in self.mode and self.text_dim <= 0:
            raise ValueError("text modes need text_dim > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.inference not in ("causal", "cloze"):
            raise ValueError("inference must be 'causal' or 'cloze'")
        if self.text_adaptor not in ("linear", "moe") or self.text_experts < 1:
            raise ValueError("text_adaptor must be 'linear' or 'moe', with at least one expert")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.similarity not in ("dot", "cosine") or self.temperature <= 0:
            raise ValueError("similarity must be 'dot' or 'cosine', with a positive temperature")
        for name, sizes, full in (("layer_heads", self.layer_heads, self.num_heads),
                                  ("layer_intermediate", self.layer_intermediate, self.intermediate_size)):
            if sizes is not None and (len(sizes) != self.num_layers or not all(1 <= n <= full for n in sizes)):
                raise ValueError(f"{name} must list {self.num_layers} sizes in [1, {full}], got {sizes}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "SeqRecConfig":
        return cls(**json.loads(Path(path).read_text()))


# Eigenvalues below this fraction of the mean are regularised rather than blown up: sentence
# encoders leave some directions with (numerically) zero variance.
WHITENING_EPS = 5e-4


def whitening(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening of row vectors: (mean [d], W [d, d]) with (x - mean) W of identity
    covariance over `embeddings` (up to the regularised directions)."""
    x = embeddings.double()
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / max(1, x.shape[0] - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eps = WHITENING_EPS * float(eigenvalues.clamp(min=0).mean()) + 1e-12
    w = eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)
    return mean.float(), w.float()


def bert_config(cfg: SeqRecConfig):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=1,  # items enter as embeddings; BERT's word table is unused
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_len,
        type_vocab_size=1,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout,
        # The mask is built in `SeqRecModel.attention_mask`; BERT itself stays bidirectional.
        is_decoder=False,
    )


class MoEAdaptor(nn.Module):
    """UniSRec's text adaptor (Hou et al., KDD 2022): G experts, each a parametric whitening
    (x - b_g) W_g with its own learned centre and projection, mixed per item by a softmax gate
    over x. Several views of a frozen sentence embedding instead of one linear map, so the
    recommender can pick the directions of the text space that matter for behaviour."""

    def __init__(self, d_in: int, d_out: int, experts: int, dropout: float):
        super().__init__()
        self.centre = nn.Parameter(torch.zeros(experts, d_in))
        self.weight = nn.Parameter(torch.empty(experts, d_in, d_out))
        for w in self.weight:
            nn.init.xavier_uniform_(w)
        # A zero gate starts as the plain average of the experts.
        self.gate = nn.Linear(d_in, experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        gates = torch.softmax(self.gate(x), dim=-1)  # [n, G]
        # (x - b_g) W_g = x W_g - b_g W_g, without an [n, G, d_in] copy of x.
        views = torch.einsum("nd,gdh->ngh", x, self.weight) - torch.einsum("gd,gdh->gh", self.centre, self.weight)
        return (gates.unsqueeze(-1) * views).sum(dim=1)


class GatedOutput(nn.Module):
    """A BERT sublayer's output with a gated residual, LayerNorm(x + g(x) * dropout(dense(f)))
    with g(x) = 2 sigmoid(x W + b): each dimension of the layer's input decides how much of the
    attention (or feed-forward) update it takes, as in the gated layers of LiGR and eSASRec.
    W and b start at zero, so g = 1 and the layer starts as BERT's own; the gate can then close
    (towards 0) or amplify (up to 2). It keeps BERT's `dense` / `dropout` / `LayerNorm`, so
    structured pruning and packed dropout treat it as the plain output."""

    def __init__(self, plain: nn.Module):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = plain.dense, plain.dropout, plain.LayerNorm
        width = plain.LayerNorm.normalized_shape[0]
        self.gate = nn.Linear(width, width)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        update = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(input_tensor + 2.0 * torch.sigmoid(self.gate(input_tensor)) * update)


class TextTower(nn.Module):
    """A pretrained BERT text encoder whose top `finetune_layers` layers train with the
    recommender; the layers below are frozen. Item texts are tokenized once and held as buffers,
    so the tower embeds any subset of items by index.

    The frozen bottom is a fixed feature extractor: it always runs without dropout, so its output
    per item never changes. With `cache_frozen` that output is computed once for the whole
    catalogue, on first use, and each step runs only the trained layers: one layer's cost, not the
    encoder's. The cache holds n_items x longest text x width floats (Amazon-Scientific: 4,385 x
    128 x 384, 822 MiB); without it the bottom is recomputed for the items each step embeds, which
    only a sampled loss keeps small. The cache is never saved, copied or pickled, and loading a
    state dict or moving the tower drops it."""

    def __init__(self, encoder_path: str, texts: list[str] | None, n_items: int, finetune_layers: int,
                 max_length: int, cache_frozen: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if texts is not None:
            # fp32 whatever the stored weights are (an export for a GPU machine carries fp16). Asked
            # for, not cast afterwards: a config without a dtype takes the weights' one, and the
            # config saved into a checkpoint would then rebuild the encoder in fp16.
            self.encoder = AutoModel.from_pretrained(encoder_path, dtype=torch.float32)
            tokens = AutoTokenizer.from_pretrained(encoder_path)(
                texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            input_ids, attention = tokens["input_ids"], tokens["attention_mask"]
        else:  # rebuilt from a checkpoint: weights and token buffers come from the state dict
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(encoder_path), dtype=torch.float32)
            input_ids = torch.zeros((n_items, max_length), dtype=torch.long)
            attention = torch.zeros((n_items, max_length), dtype=torch.long)
        self.register_buffer("input_ids", input_ids)
        self.register_buffer("token_mask", attention)
        n_layers = len(self.encoder.encoder.layer)
        self.trainable_from = max(0, n_layers - finetune_layers)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        for layer in self.encoder.encoder.layer[self.trainable_from :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.cache_frozen = cache_frozen
        self.cache_seconds: float | None = None  # how long the last cache took to compute
        self.drop_cache()
        self.register_load_state_dict_post_hook(_drop_cache)
        # from_pretrained hands the encoder over in eval mode, and Lightning does not switch
        # modules to training mode: the trained layers would train without their dropout.
        self.train()

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    def drop_cache(self) -> None:
        """Forget what derives from the weights and token buffers."""
        # Plain attributes, not buffers: outside the state dict, checkpoints and DDP's buffer
        # broadcasts.
        self._frozen_hidden: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None  # tokens per item, on the CPU
        # The whole catalogue's `_plan` by chunk size: the cache is built in one size, a caller
        # may embed the catalogue in another.
        self._catalogue: dict[int, tuple[list[tuple[torch.Tensor, int]], torch.Tensor]] = {}

    def _apply(self, fn, recurse=True):
        self.drop_cache()  # .to() / .cpu() / .cuda(): computed again where the tower now lives
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()  # deepcopy and pickling (ddp_spawn): not the cache
        state.update(_frozen_hidden=None, _lengths=None, _catalogue={})
        return state

    def forward(self, item_ids: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Mean-pooled text vectors of `item_ids` (all items when None) [n, width]. Texts are
        right-padded and attention ignores the padding, so the items run in chunks of similar
        length, each trimmed to its longest text: the same vectors at the cost of the real tokens
        (Amazon-Scientific: 46 tokens on average, 128 the widest). The chunks are planned on the
        CPU: no device sync per chunk, and none at all for the whole catalogue."""
        from components.bert.text_embeddings import mean_pool

        device = self.input_ids.device
        plan, order = self._plan(item_ids, chunk)
        pooled = []
        for part, width in plan:
            ids = part.to(device, non_blocking=True) if item_ids is None else item_ids[part.to(device, non_blocking=True)]
            mask = self.token_mask[ids, :width]
            if self.cache_frozen:
                hidden = self.frozen_hidden()[ids, :width]
            else:
                hidden = self._frozen(self.input_ids[ids, :width], mask)
            ext = _padding_mask(mask)
            for layer in self.encoder.encoder.layer[self.trainable_from :]:
                hidden = _hidden(layer(hidden, attention_mask=ext))
            pooled.append(mean_pool(hidden, mask))
        if not pooled:
            return torch.zeros((0, self.dim), device=device)
        return torch.cat(pooled)[torch.argsort(order).to(device, non_blocking=True)]

    def _plan(self, item_ids: torch.Tensor | None, chunk: int) -> tuple[list[tuple[torch.Tensor, int]], torch.Tensor]:
        """Chunks of positions in `item_ids` (of item indices when None), by token length, each
        with its width; and the order they come in."""
        if self._lengths is None:
            self._lengths = self.token_mask.sum(dim=1).cpu()
        if item_ids is None and chunk in self._catalogue:
            return self._catalogue[chunk]
        lengths = self._lengths if item_ids is None else self._lengths[item_ids.cpu()]
        order = torch.argsort(lengths)
        plan = [(part, max(1, int(lengths[part].max()))) for part in order.split(chunk) if part.numel()]
        if item_ids is None:
            self._catalogue[chunk] = plan, order
        return plan, order

    def frozen_hidden(self, chunk: int = 256) -> torch.Tensor:
        """The frozen bottom's output for every item [n_items, T, width], T the longest text.
        Past an item's own text it holds whatever its chunk's padding gave, masked wherever read."""
        if self._frozen_hidden is None:
            device = self.input_ids.device
            start = time.perf_counter()
            plan, _ = self._plan(None, chunk)
            cache = torch.zeros((self.input_ids.shape[0], max(w for _, w in plan), self.dim), device=device)
            for part, width in plan:
                part = part.to(device)
                cache[part, :width] = self._frozen(self.input_ids[part, :width], self.token_mask[part, :width])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._frozen_hidden = cache
            self.cache_seconds = time.perf_counter() - start
            log.info("text tower: the frozen layers' output for %d items x %d tokens cached (%.0f MiB) in %.1f s",
                     cache.shape[0], cache.shape[1], cache.nbytes / 2**20, self.cache_seconds)
        return self._frozen_hidden

    @torch.no_grad()
    def _frozen(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        frozen = [self.encoder.embeddings, *self.encoder.encoder.layer[: self.trainable_from]]
        modes = [m.training for m in frozen]
        for m in frozen:  # no dropout in a fixed feature extractor, in training mode too
            m.eval()
        try:
            hidden = self.encoder.embeddings(input_ids=ids)
            ext = _padding_mask(mask)
            for layer in self.encoder.encoder.layer[: self.trainable_from]:
                hidden = _hidden(layer(hidden, attention_mask=ext))
            return hidden
        finally:
            for m, mode in zip(frozen, modes):
                m.train(mode)


def _drop_cache(tower: TextTower, incompatible_keys) -> None:
    """Load-state-dict post hook (a module-level function: a lambda would not pickle)."""
    tower.drop_cache()


def _padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """Additive padding mask [B, 1, 1, T], the form every attention implementation accepts."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _hidden(layer_output) -> torch.Tensor:
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


class SeqRecModel(nn.Module):
    def __init__(
        self,
        cfg: SeqRecConfig,
        text_features: torch.Tensor | None = None,
        texts: list[str] | None = None,
    ):
        """`text_features`: the item text embeddings [n_items, text_dim]: the frozen features
        of text modes without fine-tuning, and the whitening statistics either way. `texts`: item
        texts, to build the text tower when its layers are fine-tuned. Both may be omitted when
        the weights are loaded from a state dict afterwards."""
        super().__init__()
        from transformers import BertModel

        self.cfg = cfg
        h = cfg.hidden_size
        self.encoder = BertModel(bert_config(cfg), add_pooling_layer=False)
        # Items enter as embeddings: BERT's word table is never read. Frozen, it is also no
        # "unused parameter" for DDP.
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        for i, layer in enumerate(self.encoder.encoder.layer):
            if cfg.residual == "gated":
                layer.attention.output = GatedOutput(layer.attention.output)
                layer.output = GatedOutput(layer.output)
            # A pruned model: rebuild the smaller layers (the weights come from its state dict).
            heads = cfg.layer_heads[i] if cfg.layer_heads else cfg.num_heads
            width = cfg.layer_intermediate[i] if cfg.layer_intermediate else cfg.intermediate_size
            if heads < cfg.num_heads or width < cfg.intermediate_size:
                shrink_layer(layer, torch.arange(heads), torch.arange(width))
        if "relative" in cfg.positions:
            # One learned logit bias per distance j - i in (-max_len, max_len), added to every
            # head's attention scores in every layer (as T5 shares its bias across layers). One
            # for all heads: structured pruning leaves layers with different head counts, and
            # BERT hands every layer the same mask. Zero at first: training starts from the
            # absolute-only model, or with relative positions alone from one that sees order only
            # through the causal mask (not at all in cloze pre-training).
            self.relative_bias = nn.Parameter(torch.zeros(2 * cfg.max_len - 1))
        if cfg.positions == "relative":
            # BERT always adds a position embedding: a frozen zero table takes it out.
            table = self.encoder.embeddings.position_embeddings.weight
            with torch.no_grad():
                table.zero_()
            table.requires_grad_(False)
        self.special = nn.Embedding(2, h)  # 0: padding, 1: [MASK]
        nn.init.normal_(self.special.weight, std=0.02)
        self.text_tower: TextTower | None = None
        if "id" in cfg.mode:
            self.id_embedding = nn.Embedding(cfg.n_items, h)
            nn.init.normal_(self.id_embedding.weight, std=0.02)
        if "text" in cfg.mode:
            if text_features is not None and tuple(text_features.shape) != (cfg.n_items, cfg.text_dim):
                raise ValueError(f"text_features must be {(cfg.n_items, cfg.text_dim)}, got {tuple(text_features.shape)}")
            if cfg.text_whitening:
                mean, w = (whitening(text_features) if text_features is not None
                           else (torch.zeros(cfg.text_dim), torch.eye(cfg.text_dim)))
                self.register_buffer("text_mean", mean)
                self.register_buffer("text_whitener", w)
            if cfg.text_finetune_layers > 0:
                if cfg.text_encoder_path is None:
                    raise ValueError("fine-tuning the text encoder needs text_encoder_path")
                self.text_tower = TextTower(
                    cfg.text_encoder_path, texts, cfg.n_items, cfg.text_finetune_layers, cfg.text_max_length,
                    cfg.text_cache_frozen,
                )
            else:
                if text_features is None:
                    text_features = torch.zeros((cfg.n_items, cfg.text_dim))
                # Saved with the weights, so the model is whole without the embeddings file.
                self.register_buffer("text_features", text_features.float().clone())
            if cfg.text_adaptor == "moe":
                self.text_projection = MoEAdaptor(cfg.text_dim, h, cfg.text_experts, cfg.dropout)
            else:
                self.text_projection = nn.Linear(cfg.text_dim, h)

    # ---- items ---------------------------------------------------------------------------

    def item_representations(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Representations of `item_ids` (all items when None): [n, hidden]."""
        device = self.special.weight.device
        every = item_ids is None
        if every:
            item_ids = torch.arange(self.cfg.n_items, device=device)
        rep = torch.zeros((item_ids.shape[0], self.cfg.hidden_size), device=device)
        if "text" in self.cfg.mode:
            if self.text_tower is not None:  # the whole catalogue as None: no index to plan from
                text = self.text_tower(None if every else item_ids)
            else:
                text = self.text_features[item_ids]
            rep = rep + self._project(text)
        if "id" in self.cfg.mode:
            rep = rep + self.id_embedding(item_ids)
        return rep

    def output_items(self, item_table: torch.Tensor) -> torch.Tensor:
        """The item vectors scores are taken against (unit length under cosine similarity)."""
        if self.cfg.similarity == "cosine":
            return torch.nn.functional.normalize(item_table, dim=-1)
        return item_table

    def output_users(self, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder outputs -> user vectors (unit length / temperature under cosine)."""
        if self.cfg.similarity == "cosine":
            return torch.nn.functional.normalize(hidden, dim=-1) / self.cfg.temperature
        return hidden

    def project_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Representation of items known only by their text embedding (cold start)."""
        if "text" not in self.cfg.mode:
            raise ValueError("an id-only model cannot represent items from text")
        return self._project(text_embeddings)

    def _project(self, text: torch.Tensor) -> torch.Tensor:
        if self.cfg.text_whitening:
            text = (text - self.text_mean) @ self.text_whitener
        return self.text_projection(text)

    # ---- users ---------------------------------------------------------------------------

    @staticmethod
    def attention_mask(valid: torch.Tensor, causal: bool, dtype: torch.dtype,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
        """Additive [B, 1, L, L] mask: position i may attend to valid positions j (j <= i when
        causal), with `bias` [L, L] (the relative-position logits) where it may. Each position
        may always attend to itself, so no row is fully masked (a padded row of only -inf would
        turn into NaN under fp16)."""
        length = valid.shape[1]
        allowed = valid[:, None, None, :].expand(-1, 1, length, -1)
        eye = torch.eye(length, dtype=torch.bool, device=valid.device)
        if causal:
            allowed = allowed & torch.tril(torch.ones(length, length, dtype=torch.bool, device=valid.device))
        allowed = allowed | eye
        open_ = torch.zeros((), dtype=dtype, device=valid.device) if bias is None else bias.to(dtype)
        return torch.where(allowed, open_, torch.finfo(dtype).min)

    def relative_logits(self, length: int, device: torch.device) -> torch.Tensor | None:
        """The relative-position bias [L, L] of a batch `length` wide: entry (i, j) is the
        learned logit for distance j - i. Positions are right-aligned, so the distance between
        two items does not depend on the padding (None without relative positions)."""
        if "relative" not in self.cfg.positions:
            return None
        index = torch.arange(length, device=device)
        return self.relative_bias[index[None, :] - index[:, None] + self.cfg.max_len - 1]

    def encode(
        self, items: torch.Tensor, item_table: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Hidden states [B, L, H] for left-padded item-index sequences (PAD / MASK allowed).

        `item_table` ([n_items, H]) avoids recomputing item representations when the caller
        already has them (they are also the output layer)."""
        if item_table is None:
            item_table = self.item_representations()
        is_item = items >= 0
        # F.embedding rather than indexing: it exports as an ONNX Gather, which the INT8
        # quantizer can store as INT8 (an indexing GatherND it leaves in fp32).
        emb = torch.nn.functional.embedding(items.clamp(min=0), item_table)
        # PAD -> row 0, MASK -> row 1. An embedding lookup, not indexing: indexing's backward
        # accumulates every padded position into row 0 one after another on a GPU (an index_put
        # with as many duplicates as the batch has pads).
        special = self.special((items == MASK).long())
        emb = torch.where(is_item.unsqueeze(-1), emb, special)
        valid = items != PAD
        # Positions are right-aligned to max_len: the most recent item is always at position
        # max_len - 1, so a history padded to any length <= max_len encodes the same way.
        length = items.shape[1]
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.cfg.max_len}")
        mask = self.attention_mask(valid, causal, emb.dtype, self.relative_logits(length, items.device))
        positions = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=items.device).unsqueeze(0)
        return self.encoder(inputs_embeds=emb, attention_mask=mask, position_ids=positions).last_hidden_state

    def user_vectors(self, items: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """The user vector for left-padded histories [B, L]: the causal encoder's output at the
        most recent item, or (a cloze-only model) the bidirectional output at a MASK appended
        after the history."""
        if self.cfg.inference == "cloze":
            items = torch.cat([items[:, 1:], torch.full_like(items[:, :1], MASK)], dim=1)
            return self.output_users(self.encode(items, item_table, causal=False)[:, -1])
        return self.output_users(self.encode(items, item_table, causal=True)[:, -1])

    def scores(self, user_vectors: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for `user_vectors` (as returned by `user_vectors`)."""
        if item_table is None:
            item_table = self.item_representations()
        return user_vectors @ self.output_items(item_table).T


def shrink_layer(layer: nn.Module, keep_heads: torch.Tensor, keep_neurons: torch.Tensor) -> None:
    """Rebuild one `BertLayer` with only the attention heads `keep_heads` and the FFN neurons
    `keep_neurons` (sorted indices), in place: the smaller linear layers hold exactly the kept
    rows/columns, so the pruned layer computes what the full one did with those units zeroed.

    transformers 5 has no `prune_heads`; `prune_linear_layer` does the slicing."""
    from transformers.pytorch_utils import prune_linear_layer

    attn = layer.attention.self
    size = attn.attention_head_size
    if keep_heads.numel() < attn.num_attention_heads:
        index = (keep_heads[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
        attn.query = prune_linear_layer(attn.query, index)
        attn.key = prune_linear_layer(attn.key, index)
        attn.value = prune_linear_layer(attn.value, index)
        layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
        attn.num_attention_heads = int(keep_heads.numel())
        attn.all_head_size = attn.num_attention_heads * size
    if keep_neurons.numel() < layer.intermediate.dense.out_features:
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep_neurons)
        layer.output.dense = prune_linear_layer(layer.output.dense, keep_neurons, dim=1)


def left_pad(histories: list, max_len: int) -> torch.Tensor:
    """Left-pad item sequences (most recent last) to [B, max_len] with PAD; longer ones keep
    their last `max_len` items. Built with one scatter rather than a tensor per row: it runs for
    every training batch, and a per-row loop kept a GPU waiting on the collate."""
    tails = [np.asarray(seq, dtype=np.int64)[-max_len:] if max_len else np.zeros(0, np.int64) for seq in histories]
    lengths = np.fromiter((t.size for t in tails), dtype=np.int64, count=len(tails))
    out = np.full((len(tails), max_len), PAD, dtype=np.int64)
    if lengths.sum():
        rows = np.repeat(np.arange(len(tails)), lengths)
        # Position within the row: count back from the right edge.
        ends = np.cumsum(lengths)
        cols = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths) + np.repeat(max_len - lengths, lengths)
        out[rows, cols] = np.concatenate(tails)
    return torch.from_numpy(out)


def padded_length(histories: list, max_len: int, multiple: int = 8) -> int:
    """The width a batch needs: its longest history plus one column (a cloze model's user vector
    appends a MASK after the history), rounded up to a multiple of 8 for tensor-core shapes and
    capped at `max_len`. Positions are right-aligned, so a history padded to any width up to
    max_len encodes exactly as at max_len; batches of short histories skip the padding's work."""
    needed = max((len(h) for h in histories), default=0) + 1
    return min(max_len, -(-needed // multiple) * multiple)


# A text tower's encoder architecture, in a folder of the checkpoint (its weights and token
# buffers are in the state dict): the checkpoint loads where the training machine's encoder folder
# does not exist, such as a model trained on a GPU machine and scored here.
TOWER_CONFIG = "text_encoder"


def save_model(model: SeqRecModel, out_dir: Path) -> None:
    """config.json + model.safetensors (+ the text tower's encoder config): all that is needed to
    rebuild the network."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if model.text_tower is not None:
        (out_dir / TOWER_CONFIG).mkdir(exist_ok=True)
        model.text_tower.encoder.config.to_json_file(out_dir / TOWER_CONFIG / "config.json")
        cfg = dataclasses.replace(cfg, text_encoder_path=TOWER_CONFIG)  # relative to the checkpoint
    cfg.save(out_dir / "config.json")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))


def load_model(model_dir: Path) -> SeqRecModel:
    from safetensors.torch import load_file

    cfg = SeqRecConfig.load(model_dir / "config.json")
    if cfg.text_encoder_path == TOWER_CONFIG:
        cfg = dataclasses.replace(cfg, text_encoder_path=str(Path(model_dir) / TOWER_CONFIG))
    model = SeqRecModel(cfg)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval()
