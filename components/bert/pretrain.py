"""`python -m components.bert.pretrain`: cloze pre-training (see components/bert/train.py)."""

if __name__ == "__main__":
    from components.pipeline import main

    main("pretrain_bert")
