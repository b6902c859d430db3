"""Train a PEFT LoRA adapter on a JSONL dataset, ready for `lora-gateway adapters push`."""
