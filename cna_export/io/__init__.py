"""Checkpoint I/O: model sources, config, lazy safetensors reading, streamed writing, atomic outputs, hashing."""
