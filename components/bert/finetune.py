"""`python -m components.bert.finetune`: next-item fine-tuning (see components/bert/train.py)."""

if __name__ == "__main__":
    from components.pipeline import main

    main("finetune_bert")
