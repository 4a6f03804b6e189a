"""Parameter-efficient fine-tuning: LoRA as a pure transform of the parameter tree (lora.py)."""
