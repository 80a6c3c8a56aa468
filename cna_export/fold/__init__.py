"""Fold: the pure weight math of scaling neurons, and the streamed export of an edited checkpoint."""
