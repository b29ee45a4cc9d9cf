"""Training: the Lightning module (full / LoRA fine-tuning, skip-aware steps) and its pieces."""
