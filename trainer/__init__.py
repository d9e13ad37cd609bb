"""Config, model, training, the job and its runners, the CLI.

Entrypoints: trainer/finetune.py (training), trainer/cli.py (``text2sql``).
"""
