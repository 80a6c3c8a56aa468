"""Issue 23, the mechanisms the command-line corpus (tests/test_bad_inputs.py) cannot reach one by one: every fold
path's check of its products against the storage type, the one JSON reader, device resolution, the chat-template
sandbox, the context check and prompt origins, recipe containment, escaping, and layer windows. No model loads."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from cna_export.arch import arch_for
from cna_export.arch.sites import ModelShape
from cna_export.circuit.recipe import Prompt, check_prompt_fits, find_recipe, load_prompts
from cna_export.circuit.selection import Selection
from cna_export.errors import CircuitError, CnaExportError, RecipeError, printable
from cna_export.fold.mxfp4 import fold_mxfp4_neurons_
from cna_export.fold.scale import check_multiplier, fold_site_, group_by_layer, scaled_rows
from cna_export.fold.storage import rounding_error
from cna_export.gguf.patch import SCALE_FIELDS, scale_rows_bytes
from cna_export.io.untrusted_json import parse_json
from cna_export.ship.adapter import lora_factors

REPO = Path(__file__).resolve().parent.parent
DOWN = arch_for("qwen2").down  # down_proj [hidden, n]: neuron j is column j


# Class 4: numbers checked against the dtype they land in -----------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, weight, multiplier",
    [
        (torch.float32, 1e30, 1e10),  # 1e40: inf in float32
        (torch.bfloat16, 1e30, 1e10),  # inf in bfloat16 (and in the float32 product)
        (torch.float16, 0.5, 1e6),  # 5e5: finite in float32, inf in float16 (largest 65504)
    ],
    ids=["float32", "bfloat16", "float16"],
)
def test_safetensors_fold_refuses_a_product_its_dtype_cannot_hold(dtype, weight, multiplier):
    w = torch.full((4, 6), 0.25, dtype=dtype)
    w[:, 2] = weight
    before = w.clone()
    index, mult = torch.tensor([1, 2]), torch.tensor([2.0, multiplier])
    message = f"Multiplier {multiplier:g} on neuron 2 overflows model.w, stored as {str(dtype).removeprefix('torch.')}"
    with pytest.raises(CircuitError, match=re.escape(message)):
        fold_site_(w, DOWN, 6, index, mult, what="model.w")
    assert torch.equal(w, before), "nothing is written when one product is refused"
    with pytest.raises(CircuitError):  # the dry run an export makes before its first byte refuses the same
        fold_site_(w, DOWN, 6, index, mult, what="model.w", dry_run=True)
    fold_site_(w, DOWN, 6, index, torch.tensor([2.0, 3.0]))  # a product that fits is written
    assert torch.equal(w[:, 1], (before[:, 1].float() * 2).to(dtype))


def test_a_weight_already_not_finite_in_the_source_is_left_as_it_is():
    w = torch.ones(3, 4)
    w[0, 1] = float("nan")
    w[1, 1] = float("inf")
    new = scaled_rows(w.T, torch.tensor([1]), torch.tensor([2.0]))  # the source's NaN and inf are not the edit's
    assert new[0, 0].isnan() and new[0, 1] == float("inf") and new[0, 2] == 2.0


def test_a_multiplier_that_is_inf_as_float32_is_refused():
    with pytest.raises(CircuitError, match=r"Multiplier 1e\+39 on neuron 5 overflows the multipliers of layer 2"):
        group_by_layer([(2, 5, 1e39), (2, 6, 1.0)])
    index, mult = group_by_layer([(2, 5, 3e38)])[2]  # the largest float32 values still fit
    assert mult.dtype == torch.float32 and torch.isfinite(mult).all()
    # check_multiplier, which every typed and recorded multiplier passes before any long work, asks the same
    with pytest.raises(CircuitError, match=r"^Multiplier -1e\+39 overflows the multiplier, stored as float32 \(-inf;"):
        check_multiplier(-1e39, allow_negative=True)
    assert check_multiplier(3e38) == 3e38 and check_multiplier(1e-60) == 1e-60  # an underflow to 0 is a rounding


def test_mxfp4_fold_is_exact_or_refused_and_its_dry_run_writes_nothing():
    blocks = torch.full((2, 3, 2, 16), 0x22, dtype=torch.uint8)  # every code 2: the value 1.0
    before = blocks.clone()
    with pytest.raises(CircuitError, match="cannot be scaled by 1.26765e\\+30 exactly in MXFP4"):
        fold_mxfp4_neurons_(blocks, 1, torch.tensor([3, 40]), torch.tensor([2.0, 2.0**100]))  # 2**100 x 1.0: no code
    assert torch.equal(blocks, before)
    fold_mxfp4_neurons_(blocks, 1, torch.tensor([3]), torch.tensor([2.0]), dry_run=True)
    assert torch.equal(blocks, before), "a dry run writes nothing"
    fold_mxfp4_neurons_(blocks, 1, torch.tensor([3]), torch.tensor([2.0]))
    assert int(blocks[1, 0, 0, 1] >> 4) == 4  # neuron 3 is the high nibble of byte 1: code 4 is the value 2.0


def _quantized_rows(qtype: Q, rows: int = 3, blocks: int = 2) -> np.ndarray:
    """Random codes with finite f16 scale fields of either sign (as test_gguf_patch builds them)."""
    _, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(rows, blocks * size), dtype=np.uint8)
    view = raw.reshape(rows, blocks, size)
    for off in SCALE_FIELDS[qtype]:
        scale = (rng.uniform(0.01, 1.0, (rows, blocks)) * rng.choice([-1, 1], (rows, blocks))).astype(np.float16)
        view[:, :, off : off + 2] = scale.reshape(rows, blocks, 1).view(np.uint8)
    return raw


def _float_rows(dtype: torch.dtype, value: float) -> np.ndarray:
    return torch.full((3, 32), value, dtype=dtype).view(torch.uint8).numpy()


@pytest.mark.parametrize(
    "qtype, rows, multiplier, where",
    [
        (Q.F16, lambda: _float_rows(torch.float16, 0.5), 1e6, r"blk.1.ffn_up.weight \(F16\), stored as float16"),
        (Q.BF16, lambda: _float_rows(torch.bfloat16, 1e30), 1e10, r"blk.1.ffn_up.weight \(BF16\), stored as bfloat16"),
        (Q.F32, lambda: _float_rows(torch.float32, 1e30), 1e10, r"blk.1.ffn_up.weight \(F32\), stored as float32"),
        (Q.Q8_0, lambda: _quantized_rows(Q.Q8_0), 1e9, "the Q8_0 block scales of blk.1.ffn_up.weight"),
        (Q.Q4_K, lambda: _quantized_rows(Q.Q4_K), 1e9, "the Q4_K block scales of blk.1.ffn_up.weight"),
    ],
    ids=["F16", "BF16", "F32", "Q8_0", "Q4_K"],
)
def test_gguf_patch_refuses_a_product_its_storage_cannot_hold(qtype, rows, multiplier, where):
    raw = rows()
    mult = np.array([2.0, multiplier, 1.0], np.float32)
    with pytest.raises(CnaExportError, match=rf"on neuron 7 overflows {where}"):
        scale_rows_bytes(raw, qtype, mult, "blk.1.ffn_up.weight", np.array([3, 7, 9]))


def test_gguf_patch_requantized_rows_are_checked_too():
    dense = np.random.default_rng(0).normal(0, 1, (2, 64)).astype(np.float32)
    raw = quantize(dense, Q.MXFP4)
    with pytest.raises(CnaExportError, match="overflows blk.1.ffn_up.weight \\(MXFP4, re-quantized\\)"):
        scale_rows_bytes(raw, Q.MXFP4, np.array([1.0, 3e38], np.float32), "blk.1.ffn_up.weight")
    new, err = scale_rows_bytes(raw, Q.MXFP4, np.array([0.5, 2.0], np.float32))
    assert np.isfinite(dequantize(new, Q.MXFP4)).all() and 0 <= err < 1


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_gguf_patch_reports_its_real_rounding_error(qtype):
    raw = _float_rows(torch.float16, 0.3) if qtype == Q.F16 else _quantized_rows(qtype)
    new, err = scale_rows_bytes(raw, qtype, np.full(3, 0.3, np.float32))
    assert 0 < err < 1e-3, "one f16 rounding of m x each value or block scale"
    assert np.isfinite(dequantize(new, qtype)).all()
    _, exact = scale_rows_bytes(raw, qtype, np.full(3, 2.0, np.float32))
    assert exact == 0.0


def test_rounding_error_is_never_zero_for_a_value_that_is_not_finite():
    exact = torch.tensor([1.0, 2.0, 0.0])
    assert rounding_error(torch.tensor([1.0, float("inf"), 0.0]), exact) == float("inf")
    assert rounding_error(torch.tensor([1.0, float("nan"), 0.0]), exact) == float("inf")
    assert rounding_error(torch.tensor([1.0, 2.0, 1e-3]), exact) == float("inf")  # not 0 where m x 0 is 0
    assert rounding_error(torch.tensor([1.0, 2.0, 0.0]), exact) == 0.0
    assert rounding_error(torch.tensor([1.5, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    # a source value that was already inf is the source's, not a rounding
    assert rounding_error(torch.tensor([float("inf"), 2.0]), torch.tensor([float("inf"), 2.0])) == 0.0


def test_adapter_factor_is_refused_when_float32_cannot_hold_it():
    w = torch.full((4, 6), 0.5)
    w[:, 4] = 1e30
    with pytest.raises(CircuitError, match="on neuron 4 overflows the LoRA factor of model.layers.1.mlp.down_proj"):
        lora_factors(w, DOWN, 6, torch.tensor([1, 4]), torch.tensor([2.0, 1e10]), what="model.layers.1.mlp.down_proj")
    a, b = lora_factors(w, DOWN, 6, torch.tensor([1, 4]), torch.tensor([2.0, 3.0]))
    assert torch.isfinite(b).all() and torch.allclose(w + b @ a.float(), w * torch.tensor([1, 2, 1, 1, 3, 1.0]))


# Class 5: one reader for untrusted JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"a": ' + "9" * 5000 + "}", "an integer of 5000 digits, more than 4300"),
        ('{"a": -' + "9" * 4301 + "}", "an integer of 4301 digits, more than 4300"),
        ("[" * 100000, "nested too deeply"),
        (b'{"a": "\xff\xfe"}', "not UTF-8 text"),
        ('{"a": 1,}', "Expecting property name enclosed in double quotes at line 1 column 9"),
        ("", "Expecting value at line 1 column 1"),
    ],
    ids=["huge-int", "huge-negative-int", "deep", "not-utf8", "syntax", "empty"],
)
def test_every_parser_failure_is_the_callers_one_line(text, reason):
    with pytest.raises(CircuitError) as info:
        parse_json(text, lambda why: CircuitError(f"c.json is not valid JSON ({why}).", "re-run discover."))
    assert str(info.value) == f"c.json is not valid JSON ({reason}). Fix: re-run discover."
    assert parse_json('{"a": ' + "9" * 4300 + "}", lambda why: CircuitError(why))["a"] > 0


def test_every_json_reader_goes_through_the_untrusted_reader():
    """grep: no module parses JSON itself (the external converter's script reads its own argv, and the tiny-model
    builder the tokenizer_config.json transformers has just written for it)."""
    allowed = {"io/untrusted_json.py": 1, "gguf/external.py": 1, "testing/build.py": 1}
    for path in sorted((REPO / "cna_export").rglob("*.py")):
        rel = str(path.relative_to(REPO / "cna_export"))
        calls = [line for line in path.read_text().splitlines()
                 if re.search(r"\bjson\.loads?\(", line) and not line.strip().startswith(">>>")]  # fmt: skip
        assert len(calls) == allowed.get(rel, 0), (rel, calls)


# Class 6: devices -------------------------------------------------------------------------------------------------


def test_device_resolution_lists_what_exists():
    from cna_export.io.source import available_devices, pick_device

    assert pick_device("cpu") == torch.device("cpu") and "cpu" in available_devices()
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    missing = f"cuda:{torch.cuda.device_count() + 7}"
    for name, problem in ((missing, f"Device '{missing}' is not available here"), ("tpu:0", "Unknown device 'tpu:0'"),
                          ("meta", "Device 'meta' is not available"), ("", "Unknown device ''")):  # fmt: skip
        with pytest.raises(CnaExportError, match=re.escape(problem)) as info:
            pick_device(name)
        assert f"; this machine has: {', '.join(available_devices())}." in str(info.value)


# Class 7: chat templates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, error",
    [
        ("{{ cycler.__init__.__globals__.os.system('touch {marker}') }}", "SecurityError: access to attribute '__init__'"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError: access to attribute '__class__'"),
        ("{{ raise_exception('no system role') }}", "TemplateError: no system role"),
        ("{% for %}", "TemplateSyntaxError"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ],
    ids=["init", "subclasses", "raise", "syntax", "type"],
)
def test_a_template_failure_is_one_line_and_runs_no_code(tmp_path, template, error):
    from cna_export.attribution.chat_template import render_chat

    marker = tmp_path / "PWNED"
    with pytest.raises(RecipeError, match=re.escape(error)) as info:
        render_chat(template.replace("{marker}", str(marker)), "hi", "<s>", "</s>")
    assert "\n" not in str(info.value) and not marker.exists()


def test_a_folder_template_renders_in_transformers_sandbox(tmp_path):
    """The torch route: transformers' apply_chat_template (an ImmutableSandboxedEnvironment) under `rendering`."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from cna_export.attribution.chat_template import user_turn

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    marker = tmp_path / "PWNED"
    tok.chat_template = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    with pytest.raises(RecipeError, match="The tiny chat template failed \\(SecurityError"):
        user_turn(tok, "hi", "The tiny")
    assert not marker.exists()
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert user_turn(tok, "hi", "The tiny") == "[hi]"


# Class 8: context length, prompt origins ---------------------------------------------------------------------------


def test_prompts_remember_their_file_and_line(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  \nsecond\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    (tmp_path / "p.json").write_text('["a", "b"]')
    txt, jsonl, js = (load_prompts(str(tmp_path / f"p.{s}")) for s in ("txt", "jsonl", "json"))
    assert [p.origin for p in txt] == [f"Prompt file {tmp_path}/p.txt line 1", f"Prompt file {tmp_path}/p.txt line 4"]
    assert [p.origin.rsplit(" ", 2)[1:] for p in jsonl] == [["line", "1"], ["line", "3"]]
    assert [p.origin.rsplit(" ", 2)[1:] for p in js] == [["item", "1"], ["item", "2"]]
    assert load_prompts(["x", "y"])[1].origin == "Inline prompt 2"
    assert load_prompts("builtin:neutral_diverse")[0].origin == "Built-in prompt set neutral_diverse item 1"
    assert txt == ["first", "second"] and json.loads(json.dumps(txt)) == ["first", "second"]  # still strings


def test_the_context_check_names_the_prompt_and_the_limit():
    check_prompt_fits(Prompt("hi", "Prompt file p.txt line 2"), 256, 256, "m")  # exactly the context fits
    check_prompt_fits("hi", 10**9, None, "m")  # a config that gives no context: nothing to check against
    with pytest.raises(RecipeError, match=r"^Prompt file p.txt line 2 has 257 tokens, more than the context of m "
                                          r"\(256 tokens\)"):  # fmt: skip
        check_prompt_fits(Prompt("hi", "Prompt file p.txt line 2"), 257, 256, "m")
    with pytest.raises(RecipeError, match=r"^Prompt 'typed on the command line'\.\.\. has 9 tokens"):
        check_prompt_fits("typed on the command line", 9, 8, "m")


def test_context_of_reads_the_text_config():
    from transformers import Gemma3Config, Qwen2Config

    from cna_export.attribution.collect import context_of

    class Model:
        def __init__(self, config):
            self.config = config

    assert context_of(Model(Qwen2Config(max_position_embeddings=300))).limit == 300
    wrapped = Gemma3Config(text_config={"max_position_embeddings": 77})
    assert context_of(Model(wrapped)).limit == 77


# Class 9: recipes stay in their folder -----------------------------------------------------------------------------


def test_recipe_prompt_files_stay_inside_the_recipe_folder(tmp_path):
    recipe = tmp_path / "recipe"
    (recipe / "sets").mkdir(parents=True)
    (recipe / "sets" / "a.txt").write_text("inside\n")
    (recipe / "alias.txt").symlink_to(recipe / "sets" / "a.txt")  # a link that stays inside is fine
    (tmp_path / "secret.txt").write_text("outside\n")
    (recipe / "out.txt").symlink_to(tmp_path / "secret.txt")
    assert load_prompts("sets/a.txt", recipe) == ["inside"] == load_prompts("alias.txt", recipe)
    for ref, problem in (("../secret.txt", "is not inside"), (str(tmp_path / "secret.txt"), "is not inside"),
                         ("sets/../../secret.txt", "is not inside"), ("~/secret.txt", "is not inside"),
                         ("out.txt", "links outside"), ("a\0b.txt", "holds a NUL")):  # fmt: skip
        with pytest.raises(RecipeError, match=problem):
            load_prompts(ref, recipe)
    assert load_prompts(str(tmp_path / "secret.txt")) == ["outside"]  # typed on the command line: the user's call


def test_builtin_takes_only_shipped_names_and_a_circuit_names_only_shipped_recipes(tmp_path):
    for name in ("../prompts/neutral_diverse", "neutral_diverse/../neutral_diverse", "/etc/hostname", ""):
        with pytest.raises(RecipeError, match="No built-in prompt set"):
            load_prompts(f"builtin:{name}")
    (tmp_path / "mine.yaml").write_text("version: 1\n")
    assert find_recipe(tmp_path / "mine.yaml") == tmp_path / "mine.yaml"  # typed: any path
    assert find_recipe("refusal-ablate", shipped_only=True).name == "refusal-ablate.yaml"
    with pytest.raises(RecipeError, match="pass a shipped recipe's name"):
        find_recipe(tmp_path / "mine.yaml", shipped_only=True)


def test_a_recipes_system_prompt_and_answer_keys_are_contained_the_same_way(tmp_path):
    """companions (system prompts, answer keys) share the prompt sets' containment and YAML reader."""
    from cna_export.circuit.companions import load_answers, load_system_prompt

    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (tmp_path / "secret.txt").write_text("hf_secret\n")
    (recipe / "sys.txt").write_text("You are terse.\n")
    (recipe / "out.txt").symlink_to(tmp_path / "secret.txt")
    (recipe / "big.yaml").write_text("answers: [" + "9" * 5000 + "]\n")
    assert load_system_prompt("sys.txt", recipe) == "You are terse."
    for ref, problem in (("../secret.txt", "Recipe system prompt '../secret.txt' is not inside"),
                         (str(tmp_path / "secret.txt"), "is not inside the recipe's folder"),
                         ("out.txt", "Recipe system prompt 'out.txt' links outside"),
                         ("builtin:../prompts/support_bot_system", "No built-in system prompt")):  # fmt: skip
        with pytest.raises(RecipeError, match=re.escape(problem)):
            load_system_prompt(ref, recipe)
    assert load_system_prompt(str(tmp_path / "secret.txt"), None) == "hf_secret"  # typed: the user's call
    with pytest.raises(RecipeError, match=r"is not valid YAML \(a number too long to read\)"):
        load_answers("big.yaml", recipe)


# Class 10: escaping ------------------------------------------------------------------------------------------------


def test_printable_escapes_what_a_terminal_acts_on():
    assert printable("a\x1b[2Jb\x07c\x9bd\x7f") == r"a\x1b[2Jb\x07c\x9bd\x7f"
    assert printable("rtl\u202eevil\u2066x\u2028y") == r"rtl\u202eevil\u2066x\u2028y"
    assert printable("two\nlines\tand\r", keep="\n\t") == "two\nlines\tand\\r"
    assert printable("déjà vu, 日本語, emoji 🙂") == "déjà vu, 日本語, emoji 🙂"
    assert str(CnaExportError("model_type llama\x1b]52;c;ZWNobw==\x07", "fix\x1b[2J.")) == (
        r"model_type llama\x1b]52;c;ZWNobw==\x07 Fix: fix\x1b[2J."
    )


def test_what_a_command_prints_and_logs_is_escaped(tmp_path, capsys):
    from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection
    from cna_export.cli import main as cli

    nasty = "refusal\x1b]52;c;ZWNobw==\x07\x1b[2J\u202e"
    circuit = Circuit(
        behaviour=nasty, multiplier=0.0,
        model=ModelIdentity(source="m\x1b[31m", model_type="qwen2", num_layers=3, intermediate_size=8, hidden_size=4),
        prompts={"positive": PromptSet(count=1, sha256=""), "negative": PromptSet(count=1, sha256="")},
        selection=RecordedSelection(top_k=1), neurons=[Neuron(layer=1, index=2, delta=0.5)],
    )  # fmt: skip
    circuit.save(tmp_path / "c.json")
    assert cli.main(["inspect", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert r"refusal\x1b]52;c;ZWNobw==\x07\x1b[2J\u202e" in out and r"m\x1b[31m" in out
    assert printable(out, keep="\n") == out, "no raw control character reaches the terminal"
    record = logging.LogRecord("cna_export", logging.WARNING, __file__, 1, "tensor %s", ("blk.0\x1b[2J",), None)
    assert cli._PrintableFormatter("%(message)s").format(record) == r"tensor blk.0\x1b[2J"


# Class 14: layer windows ------------------------------------------------------------------------------------------


def test_a_layer_window_that_the_model_cannot_honour_is_refused():
    shape = ModelShape(num_layers=3, intermediate_size=112, hidden_size=64)
    assert Selection(skip_first_layers=1, skip_last_layers=1).layer_window(shape) == range(1, 2)
    for first, last in ((2, 1), (3, 0), (0, 3), (5, 5)):
        with pytest.raises(RecipeError, match=f"Skipping the first {first} and the last {last} layers leaves none"):
            Selection(top_k=1, skip_first_layers=first, skip_last_layers=last).resolve_k(shape)
    assert Selection(top_k=112, skip_first_layers=2).resolve_k(shape) == 112  # exactly the window
    with pytest.raises(RecipeError, match=r"k=113 neurons do not fit layers 2..2, which hold 112"):
        Selection(top_k=113, skip_first_layers=2).resolve_k(shape)
    wide = ModelShape.of_widths([8, 16, 32], hidden_size=4)
    assert wide.neurons_in(range(1, 3)) == 48
    with pytest.raises(RecipeError, match="which hold 8"):
        Selection(top_k=9, skip_last_layers=2).resolve_k(wide)
