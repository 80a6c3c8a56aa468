"""The weight types that cna-export's own GGUF converter writes (`gguf --outtype`, `apply --gguf`), by name.

Apart from gguf/convert.py, which maps each to its gguf-py types, so that the command line can offer them without
importing gguf-py.
"""

OUTTYPE_NAMES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
