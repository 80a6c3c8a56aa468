"""Ship: the model card with provenance, and upload to the Hugging Face Hub."""
