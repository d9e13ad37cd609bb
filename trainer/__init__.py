"""Fine-tuning entrypoint, callbacks and the local runner (see trainer/finetune.py)."""
