"""The `cna-export` command line: argument wiring only; every command calls one library function.

`main.py` holds the parser and `main`; `options.py` the shared options; one module per command or subject:
`edit.py` (run, discover, apply), `gguf.py` (patch-gguf, gguf), `recipe.py` (new-recipe), `circuit.py` (inspect),
`adapter.py`, `eval.py`, `chat.py`, `sweep.py`, `push.py`, `diff.py`, `tune.py`.

Each command imports the library it calls inside its handler: `cna-export --help` and argument errors then
answer without importing torch, transformers or llama.cpp.
"""
