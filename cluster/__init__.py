"""Running the fine-tuning on a Determined AI cluster: experiment configs and checkpoints."""
