"""Fine-tuning: YAML config -> dataset -> LoRA run -> PEFT adapter + manifest (train.manifest)."""
