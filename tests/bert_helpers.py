"""A tiny BERT text encoder saved as a local Hugging Face folder (tests never load MiniLM)."""

from __future__ import annotations

from pathlib import Path

from components.synthetic import ADJECTIVES, THEMES

TINY_BERT_OVERRIDES = [
    "bert.max_len=12",
    "bert.hidden_size=16",
    "bert.num_layers=1",
    "bert.num_heads=2",
    "bert.intermediate_size=32",
    "bert.batch_size=32",
    "bert.pretrain.max_epochs=2",
    "bert.finetune.max_epochs=3",
    "bert.refit_epochs=1",
    "bert.text_encoder.max_length=24",
    "bert.trainer.num_threads=1",
    "bert.trainer.accelerator=cpu",
]


def make_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 16-wide BERT with a word-level vocabulary covering the synthetic texts."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for vocab in THEMES.values() for w in vocab} | set(ADJECTIVES) | set(THEMES))
    extra = ["part", "of", "the", "with", "collection", "category", ",", ".", ":"] + [str(i) for i in range(100)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words) | set(extra))
    # transformers 5 takes the vocabulary itself (a `vocab_file` argument is silently ignored,
    # which left a tokenizer that read every word as [UNK] and every text as the same vector).
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert "[UNK]" not in tokenizer.tokenize(" ".join(words[:20])), "the tiny vocabulary must cover the synthetic texts"
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    # Seeded: an unseeded init gives every test session different text embeddings, and the
    # quality checks built on them would pass or fail by draw.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder
