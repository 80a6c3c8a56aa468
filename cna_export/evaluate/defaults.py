"""Default sizes of the evaluation's checks, apart from the code that runs them, so that the command line can show
them in `--help` without importing torch (cna_export/evaluate/depth.py reads them)."""

LONG_CONTEXT_WORDS = 3000  # about 4k tokens in the tokenizers of current chat models (1.3 tokens a word)
