"""cap-export: turn trained adapters into PEFT LoRA, merged models and GGUF."""
