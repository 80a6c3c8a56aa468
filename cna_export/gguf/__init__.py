"""GGUF: structural checks, conversion from Hugging Face folders, in-place patching of quantized files, Ollama."""
