"""Checkpoint I/O: model sources, config, lazy safetensors reading, streamed writing, outputs checked and committed together (and the names they write), hashing."""
