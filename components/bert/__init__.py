"""The BERT-based sequence recommender.

- `text_embeddings`: item texts -> vectors with a pretrained BERT (mean pooling), cached on disk.
- `model`: the recommender network (item representations from text and/or ids, a BERT encoder
  over the user's recent items, tied output scores), rebuilt from its JSON config.
- `data`, `module`: the Lightning DataModule and LightningModule (cloze pre-training, next-item
  fine-tuning, full or sampled softmax).
- `train`: the `pretrain` and `finetune` stages (`python -m components.bert.pretrain|finetune`).
"""
