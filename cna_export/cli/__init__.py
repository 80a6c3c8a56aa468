"""The `cna-export` command line: argument wiring only; every command calls one library function.

`main.py` holds the parser and `main`; `edit.py` and `audit.py` the commands; `options.py` the shared options.
"""
