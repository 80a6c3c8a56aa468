"""Ship: the model card with provenance, upload to the Hugging Face Hub, and circuits as LoRA adapters."""
