"""cna_export: find the MLP neurons behind one behaviour and ship the edit as an ordinary checkpoint."""

__version__ = "0.1.0"
