"""`python -m components.bert.finetune`: next-item fine-tuning (see components/bert/train.py)."""

if __name__ == "__main__":
    from components.bert.train import main
    from components.cli import run_main

    run_main(lambda: main("finetune"))
