"""The architecture table is data that every stage reads: each row has a tiny test model, and each row's neuron
sites match that model's checkpoint, its runtime modules and (where converted) its GGUF."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest
import torch
from conftest import ARCHS, MOE_ARCHS, TINY

from cna_export.arch import (
    ARCHITECTURES,
    GGUF_MODEL_TYPES,
    ModelShape,
    Site,
    arch_for,
    compatible,
    model_type_for_gguf,
    shape_of,
)
from cna_export.arch.experts import DenseLayers
from cna_export.attribution.hooks import decoder_layers, down_projs
from cna_export.errors import ArchitectureError
from cna_export.fold.scale import fold_site, fold_site_
from cna_export.io.checkpoint import CheckpointReader
from cna_export.io.source import describe, resolve


def test_every_table_row_has_a_tiny_model():
    """A family cannot ship untested: adding a row to ARCHITECTURES needs a row in the tiny-model table, whose kind
    matches the family's (a mixture of experts is a "moe" model)."""
    missing = sorted(set(ARCHITECTURES) - set(TINY))
    assert not missing, f"no tiny test model for {missing}: add it to TINY in cna_export/testing/tiny.py"
    assert {a for a, t in TINY.items() if t.kind == "moe"} == {a for a, s in ARCHITECTURES.items() if s.experts}


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


# Which layers of an MoE model are dense: each family's own config keys (issue 23, class 13) -------------------------
# Every family's dense-layer keys, with values that change the answer for a family that reads them.
DENSE_KEYS = {
    "first_k_dense_replace": 1,
    "mlp_only_layers": [1],
    "decoder_sparse_step": 2,
    "moe_layers": [0],
    "interleave_moe_layer_step": 3,
}


def _built_dense_layers(model, spec) -> set[int]:
    """The layers where transformers built a dense MLP (no experts module)."""
    dense = set()
    for i, layer in enumerate(decoder_layers(model, spec)):
        try:
            layer.get_submodule(spec.experts.module)
        except AttributeError:
            dense.add(i)
    return dense


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_dense_layers_are_the_ones_transformers_builds_whatever_other_families_keys_say(arch):
    """The config carries every other family's dense-layer keys (DeepSeek's `first_k_dense_replace` in a Qwen2-MoE,
    Mixtral or Qwen3-MoE config ...): the dense layers the table reads are still exactly those where transformers
    builds a dense MLP, from the loaded config (discover) and from the config.json dict (apply, inspect), where
    Llama 4's `moe_layers` is missing too (transformers then takes every `interleave_moe_layer_step`-th layer)."""
    import transformers
    from transformers import AutoConfig

    spec = arch_for(arch)
    own = {getattr(spec.experts.dense, f.name) for f in dataclasses.fields(DenseLayers)}
    tiny = TINY[arch].config
    text = {**tiny.get("text_config", tiny), **{k: v for k, v in DENSE_KEYS.items() if k not in own}}
    config = AutoConfig.for_model(arch, **({**tiny, "text_config": text} if "text_config" in tiny else text))
    torch.manual_seed(0)
    model = getattr(transformers, spec.loader).from_config(config)
    built = _built_dense_layers(model, spec)
    assert shape_of(model.config.get_text_config()).moe.dense_layers == built
    assert shape_of({**text, "model_type": spec.text_model_type or arch}).moe.dense_layers == built
    assert arch not in ("qwen2_moe", "qwen3_moe", "mixtral") or built == set(tiny.get("mlp_only_layers", []))


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [
        ("qwen2_moe", "decoder_sparse_step", 0, "found 0; it should be a positive integer"),
        ("qwen2_moe", "decoder_sparse_step", True, "found True; it should be a positive integer"),
        ("qwen3_moe", "mlp_only_layers", "0", "found '0'; it should be a list of layer indices"),
        ("qwen3_moe", "mlp_only_layers", [0, -1], "found [0, -1]; it should be a list of layer indices"),
        ("deepseek_v3", "first_k_dense_replace", 1.5, "found 1.5; it should be a count of layers"),
    ],
)
def test_a_dense_layer_key_transformers_cannot_read_is_one_line(arch, key, value, message):
    """A family's own key with a value its transformers code would crash on (or misread) is refused in one line;
    the same value under a key the family does not read changes nothing."""
    config = {**TINY[arch].config, "model_type": arch}
    with pytest.raises(ArchitectureError, match=re.escape(f"config.json has no valid {key} ({message}).")):
        shape_of({**config, key: value})
    other = next(k for k in DENSE_KEYS if k not in {key, *vars(arch_for(arch).experts.dense).values()})
    assert shape_of({**config, other: value}) == shape_of(config)


def test_a_module_the_loaded_model_lacks_is_one_line(tmp_path):
    """Where a loaded model has no module the table names (its config and the table disagree on a layer), hooks and
    runtime scaling refuse in one line naming the layer and the module, not with an AttributeError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cna_export.attribution.experts import scaled_units

    spec = arch_for("qwen2_moe")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2_moe", **TINY["qwen2_moe"].config))
    expected = "Layer 0 of this qwen2_moe model has no module 'mlp.down_proj', where the architecture table expects it"
    with pytest.raises(ArchitectureError, match=re.escape(expected)) as err:
        down_projs(model, spec)  # every layer of this model is MoE: none has a dense down_proj
    assert len(str(err.value).splitlines()) == 1 and "config.json" in str(err.value)
    with pytest.raises(ArchitectureError, match=re.escape(expected)):
        with scaled_units(decoder_layers(model, spec), spec, {(0, None): (torch.tensor([1]), torch.tensor([0.0]))}):
            pass
    with pytest.raises(ArchitectureError, match="This qwen2_moe model has no module 'model.decoder'"):
        decoder_layers(model, dataclasses.replace(spec, layers_module="model.decoder"))
