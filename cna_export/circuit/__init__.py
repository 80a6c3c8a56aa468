"""What an edit is: the circuit file (neurons, multipliers, provenance), the selection knobs and recipes."""

from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection, prompt_set
from cna_export.circuit.selection import Selection

__all__ = ["Circuit", "ModelIdentity", "Neuron", "PromptSet", "RecordedSelection", "Selection", "prompt_set"]
