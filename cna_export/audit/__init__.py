"""Audit: compare two checkpoints tensor by tensor, recover the neuron edit, verify it against a circuit."""
