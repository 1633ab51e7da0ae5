"""cap-train: DeepSpeed pipeline training of control adapters, LoRA, QLoRA and full fine-tunes."""
