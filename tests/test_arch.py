"""The architecture table is data that every stage reads: each row has a tiny test model, and each row's neuron
sites match that model's checkpoint, its runtime modules and (where converted) its GGUF."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import ARCHS, FAMILY_TINY, MOE_TINY, TINY

from cna_export.arch import (
    ARCHITECTURES,
    GGUF_MODEL_TYPES,
    ModelShape,
    Site,
    arch_for,
    compatible,
    model_type_for_gguf,
)
from cna_export.attribution.hooks import down_projs
from cna_export.errors import ArchitectureError
from cna_export.fold.scale import fold_site, fold_site_
from cna_export.io.checkpoint import CheckpointReader
from cna_export.io.source import describe, resolve


def test_every_table_row_has_a_tiny_model():
    """A family cannot ship untested: adding a row to ARCHITECTURES needs a tiny config in tests/conftest.py."""
    missing = sorted(set(ARCHITECTURES) - set(TINY) - set(MOE_TINY) - set(FAMILY_TINY))
    assert not missing, f"no tiny test model for {missing}: add it to TINY in tests/conftest.py"


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_match_checkpoint_and_modules(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    spec, shape, _ = describe(resolve(str(tiny_models[arch])))
    reader = CheckpointReader(tiny_models[arch])
    for layer in range(shape.num_layers):
        for site in spec.sites().values():
            assert reader.entry(site.name(layer)).shape == site.expected_shape(shape)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    projs = down_projs(model, spec)
    assert len(projs) == shape.num_layers
    assert all(getattr(p, "in_features", shape.intermediate_size) == shape.intermediate_size for p in projs)


def test_fused_site_touches_only_its_part():
    """Phi-3 style gate_up_proj [2n, hidden]: the up neurons are the second half; the gate half stays bit-identical."""
    n, hidden = 6, 4
    site = Site("model.layers.{i}.mlp.gate_up_proj.weight", axis=0, part=1, parts=2)
    assert site.expected_shape(ModelShape(1, n, hidden)) == (2 * n, hidden)
    w = torch.randn(2 * n, hidden)
    index, mult = torch.tensor([0, 4]), torch.tensor([0.0, 2.0])
    out = fold_site(w, site, n, index, mult)
    torch.testing.assert_close(out[:n], w[:n], rtol=0, atol=0)
    torch.testing.assert_close(out[n + 4], 2 * w[n + 4], rtol=0, atol=0)
    assert bool((out[n] == 0).all()) and torch.equal(out[n + 1 : n + 4], w[n + 1 : n + 4])


def test_expert_axis_site():
    """A tensor that stacks experts [E, hidden, n] (down) : neuron j of expert e is column j of slice e."""
    site = Site("model.layers.{i}.mlp.experts.down_proj", axis=2, expert_axis=0)
    shape = ModelShape(1, 5, 3)
    assert site.expected_shape(shape, experts=4) == (4, 3, 5)
    w = torch.randn(4, 3, 5)
    fold_site_(w2 := w.clone(), site, 5, torch.tensor([2]), torch.tensor([0.0]), expert=1)
    assert bool((w2[1, :, 2] == 0).all()) and torch.equal(w2[0], w[0]) and torch.equal(w2[1, :, 3], w[1, :, 3])


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(ArchitectureError, match="llama"):
        arch_for("not-a-model")


def test_rows_are_unique_and_each_gguf_architecture_reads_back_as_one():
    """The table is built once from the vendor blocks: no model_type twice, and `GGUF_MODEL_TYPES` (built from the
    rows' `from_gguf`) names exactly one row for every llama.cpp architecture in the table."""
    from cna_export.arch.families import FAMILIES

    assert len(ARCHITECTURES) == len(FAMILIES)
    readers = Counter(spec.gguf_name for spec in FAMILIES if spec.from_gguf)
    assert set(readers) == {spec.gguf_name for spec in FAMILIES} and set(readers.values()) == {1}
    assert GGUF_MODEL_TYPES == {spec.gguf_name: spec.model_type for spec in FAMILIES if spec.from_gguf}


def test_gguf_architecture_map():
    """The explicit map: a llama-architecture GGUF named Mistral is a mistral model, and circuits carry across the
    model types that share one llama.cpp architecture and the same neuron sites."""
    assert model_type_for_gguf("llama", "Mistral-7B-Instruct-v0.3") == "mistral"
    assert model_type_for_gguf("llama", "SmolLM2 135M Instruct") == "llama"
    assert model_type_for_gguf("gemma3") == "gemma3_text"
    assert compatible("mistral", "llama") and not compatible("qwen2", "llama")
    with pytest.raises(ArchitectureError, match="not supported"):
        model_type_for_gguf("mamba")
