"""Evaluate: generation-based behaviour rates, KL and quality, sweeps over k and m, reports and plots."""
