"""The plugin learns each model's parameters from GET /v1/models (no family known by name).

A fake /v1/models answer shaped as the engine publishes it (ParamSpec.to_json lists, rules,
limits, presets) drives the parsing, the per-model state, the request JSON, the Explore
grid, layer names, provenance and the docker's form. Runs under PyQt6 and PyQt5.
"""

from __future__ import annotations

import copy
import json
from dataclasses import fields

import pytest
from instruct_edit import provenance
from instruct_edit.model import naming
from instruct_edit.model.state import CONNECTED, EditState
from instruct_edit.qt import QApplication, QtWidgets
from instruct_edit.request import EditRequest, RequestError, explore_grid
from instruct_edit.specs import LEGACY_MODEL, SHARED_FIELDS, EngineModels, Limits, ModelInfo

IP2P, KONTEXT, QWEN = "timbrooks/instruct-pix2pix", "black-forest-labs/FLUX.1-Kontext-dev", "Qwen/Qwen-Image-Edit-2511"
LIGHTNING_LORA = {"repo": "lightx2v/Qwen-Image-Edit-2511-Lightning", "file": "lightning-8steps.safetensors",
                  "strength": 1.0}

#: Shaped like the engine's answer: Family.describe() + the catalogue's fields + `limits`.
MODELS = {
    "default_model": IP2P,
    "loras": ["style-a.safetensors"],
    "limits": {"max_instruction_chars": 1000, "max_variants": 16, "max_seed": 2**32 - 1,
               "max_steps": 200, "max_loras": 8, "lora_strength": [-4.0, 4.0], "resolution": [64, 2048]},
    "models": [
        {"id": IP2P, "name": "InstructPix2Pix", "source": "catalogue", "default": True,
         "available_locally": True, "family": "sd-ip2p", "family_label": "InstructPix2Pix",
         "params": [
             {"name": "text_guidance", "kind": "float", "default": 7.5, "label": "Text guidance",
              "help": "s_T: how strongly to follow the instruction", "minimum": 0.0, "maximum": 30.0,
              "step": 0.5, "explore": 2.5},
             {"name": "image_guidance", "kind": "float", "default": 1.5, "label": "Image guidance",
              "help": "s_I: how closely to stay with the input", "minimum": 0.0, "maximum": 30.0,
              "step": 0.05, "explore": 0.5},
             {"name": "scheduler", "kind": "choice", "default": "default", "label": "Scheduler",
              "help": "default = the model's own",
              "choices": ["default", "euler-a", "euler", "dpm++", "ddim", "lcm"]},
         ],
         "resolution": {"rule": "long_side", "default": 512, "multiple": 8, "minimum": 64, "maximum": 2048},
         "steps": {"default": 20, "minimum": 1, "maximum": 200},
         "supports": {"mask": True, "loras": True, "negative_prompt": False},
         "licence": "MIT", "non_commercial": False, "download_gb": 4.3, "vram_gb": {"full": 3.5},
         "recommended": {"steps": 20, "resolution": 512,
                         "options": {"text_guidance": 7.5, "image_guidance": 1.5, "scheduler": "default"}},
         "presets": []},
        {"id": KONTEXT, "name": "FLUX.1 Kontext [dev]", "source": "catalogue", "default": False,
         "available_locally": False, "family": "flux-kontext", "family_label": "FLUX.1 Kontext",
         "params": [
             {"name": "guidance", "kind": "float", "default": 2.5, "label": "Guidance",
              "help": "Distilled guidance", "minimum": 0.0, "maximum": 10.0, "step": 0.1, "explore": 1.0},
         ],
         "resolution": {"rule": "area", "default": 1024, "multiple": 16, "minimum": 256, "maximum": 2048},
         "steps": {"default": 28, "minimum": 1, "maximum": 100},
         "supports": {"mask": True, "loras": True, "negative_prompt": False},
         "licence": "FLUX.1 [dev] Non-Commercial License", "non_commercial": True, "download_gb": 33.0,
         "vram_gb": {"full": 26.0, "bnb-4bit": 12.0},
         "recommended": {"steps": 28, "resolution": 1024, "options": {"guidance": 2.5}}, "presets": []},
        {"id": QWEN, "name": "Qwen-Image-Edit-2511", "source": "catalogue", "default": False,
         "available_locally": False, "family": "qwen-image-edit", "family_label": "Qwen-Image-Edit",
         "params": [
             {"name": "true_cfg_scale", "kind": "float", "default": 4.0, "label": "True CFG",
              "help": "Classifier-free guidance against the negative prompt", "minimum": 1.0,
              "maximum": 20.0, "step": 0.1, "explore": 1.0},
             {"name": "negative_prompt", "kind": "text", "default": " ", "label": "Negative prompt",
              "help": "What the edit should avoid", "max_length": 1000},
         ],
         "resolution": {"rule": "area", "default": 1024, "multiple": 32, "minimum": 256, "maximum": 2048},
         "steps": {"default": 40, "minimum": 1, "maximum": 100},
         "supports": {"mask": True, "loras": True, "negative_prompt": True},
         "licence": "Apache-2.0", "non_commercial": False, "download_gb": 58.0, "vram_gb": {"full": 60.0},
         "recommended": {"steps": 40, "resolution": 1024,
                         "options": {"true_cfg_scale": 4.0, "negative_prompt": " "}},
         "presets": [{"id": "lightning-8", "label": "Lightning 8 steps", "loras": [LIGHTNING_LORA],
                      "steps": 8, "options": {"true_cfg_scale": 1.0}}]},
    ],
}


@pytest.fixture(scope="module", autouse=True)
def app():
    return QApplication.instance() or QApplication([])


def engine_state(answer: dict | None = None) -> EditState:
    state = EditState()
    state.learn_models(copy.deepcopy(answer or MODELS))
    state.instruction, state.random_seed, state.seed = "make it red", False, 3
    return state


# --- what the engine publishes -------------------------------------------------------------------


def test_models_answer_parses_into_model_infos():
    parsed = EngineModels.from_json(MODELS)
    assert [m.id for m in parsed.models] == [IP2P, KONTEXT, QWEN]
    assert parsed.default_model == IP2P and parsed.find("") .id == IP2P
    ip2p, kontext, qwen = parsed.models
    assert [s.name for s in ip2p.params] == ["text_guidance", "image_guidance", "scheduler"]
    assert [s.short for s in ip2p.params[:2]] == ["s_T", "s_I"]  # from the help's "s_T: …"
    assert kontext.params[0].short == "guidance" and qwen.params[0].short == "true CFG"
    assert kontext.resolution.rule == "area" and kontext.default_steps == 28
    assert kontext.non_commercial and "Non-Commercial" in kontext.licence
    assert qwen.presets[0].steps == 8 and qwen.presets[0].loras[0].path.endswith("lightning-8steps.safetensors")
    assert [a.name for a in ip2p.explore_axes()] == ["text_guidance", "image_guidance"]
    assert parsed.loras == ("style-a.safetensors",) and parsed.limits == Limits()


JUNK_PARAMS = [
    "not a spec", None, 7, {"kind": "float", "default": 1.0},  # no name
    {"name": "x", "kind": "matrix", "default": 1},  # unknown kind
    {"name": "lo_hi", "kind": "float", "default": 1.0, "minimum": 5.0, "maximum": 1.0},
    {"name": "outside", "kind": "float", "default": 50.0, "minimum": 0.0, "maximum": 10.0},
    {"name": "nan", "kind": "float", "default": float("nan")},
    {"name": "notanumber", "kind": "int", "default": "3"},
    {"name": "nochoices", "kind": "choice", "default": "a", "choices": []},
    {"name": "flag", "kind": "bool", "default": "yes"},
    {"name": "seed", "kind": "int", "default": 1},  # a shared field's name
    {"name": "not an identifier!", "kind": "bool", "default": True},
    {"name": "guidance", "kind": "float", "default": 2.0, "minimum": 0.0, "maximum": 9.0, "explore": "big"},
    {"name": "guidance", "kind": "float", "default": 3.0},  # a second one of the same name
]


@pytest.mark.parametrize("answer", [
    None, "text", 42, [], [1, "x", None], {"models": "nope"}, {"models": [None, 3, "x", {"name": "no id"}]},
    {"models": [{"id": "m", "family": "f", "params": "nope", "steps": "x", "resolution": [1],
                 "presets": [None, {"id": 3}], "vram_gb": [], "supports": 5, "recommended": 7}],
     "limits": {"max_variants": "lots", "lora_strength": [4, -4], "max_seed": -1, "resolution": "x"}},
])
def test_malformed_answers_never_raise(answer):
    parsed = EngineModels.from_json(answer)
    state = EditState()
    state.learn_models(answer)
    assert state.limits == Limits()  # junk limits: the fallbacks
    for info in parsed.models:
        assert isinstance(info, ModelInfo) and info.params == ()
    state.instruction = "x"
    assert set(state.request().validate().to_dict()) <= set(SHARED_FIELDS)


def test_malformed_param_entries_are_left_out_and_the_rest_kept():
    entry = copy.deepcopy(MODELS["models"][1])
    entry["params"] = JUNK_PARAMS + entry["params"]
    entry["presets"] = [{"id": "bad", "loras": [{"strength": 1}]}, {"id": "unknown-option", "options": {"x": 1}},
                        {"id": "ok", "steps": 8, "options": {"guidance": 3.0}}]
    info = ModelInfo.from_json(entry)
    assert info is not None
    # The first well-formed "guidance" wins; its junk explore step is dropped.
    assert [s.name for s in info.params] == ["guidance"] and info.params[0].default == 2.0
    assert info.params[0].explore is None and info.explore_unavailable()
    assert [p.id for p in info.presets] == ["ok"]


def test_fallback_limits_equal_the_engines():
    """An engine that sends no `limits` gets API version 1's: the engine's own numbers."""
    from engine import request as engine_request

    fallback = Limits()
    assert fallback.max_instruction_chars == engine_request.MAX_INSTRUCTION_CHARS
    assert fallback.max_variants == engine_request.MAX_VARIANTS
    assert fallback.max_seed == engine_request.MAX_SEED
    assert fallback.max_loras == engine_request.MAX_LORAS
    assert fallback.lora_strength == tuple(engine_request.LORA_STRENGTH_RANGE)
    assert fallback.max_steps == engine_request.MAX_STEPS
    assert fallback.resolution == (engine_request.MIN_RESOLUTION, engine_request.MAX_RESOLUTION)
    published = getattr(engine_request, "limits_json", None)
    if published is not None:  # the engine's published limits parse back to the same values
        assert Limits.from_json(json.loads(json.dumps(published()))) == fallback


def test_legacy_entries_take_instructpix2pix_parameters_as_old_engines_did():
    """An engine from before model families sends no family/params: it takes IP2P's three."""
    info = ModelInfo.from_json({"id": "fake-model", "name": "Fake", "default": True})
    assert info is not None and info.legacy and info.family == "sd-ip2p"
    assert [s.name for s in info.params] == ["text_guidance", "image_guidance", "scheduler"]
    assert info.default_steps == 20 and info.default_resolution == 512
    from engine import request as engine_request

    by_name = {p["name"]: p for p in LEGACY_MODEL["params"]}
    for name in ("text_guidance", "image_guidance"):
        assert (by_name[name]["minimum"], by_name[name]["maximum"]) == tuple(engine_request.GUIDANCE_RANGE)
    assert tuple(by_name["scheduler"]["choices"]) == tuple(engine_request.SCHEDULERS)
    try:
        from engine.families import get_family
    except Exception as err:  # pragma: no cover - the engine's families are optional here
        pytest.skip(f"engine families not importable: {err}")
    family = {s.name: s for s in get_family("sd-ip2p").params}
    for spec in info.params:
        theirs = family[spec.name]
        assert (spec.kind, spec.default, spec.minimum, spec.maximum, spec.choices) == (
            theirs.kind, theirs.default, theirs.minimum, theirs.maximum, tuple(theirs.choices)), spec.name


# --- the request ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "keys"), [
    (IP2P, {"text_guidance", "image_guidance", "scheduler"}),
    (KONTEXT, {"guidance"}),
    (QWEN, {"true_cfg_scale", "negative_prompt"}),
])
def test_request_json_has_exactly_the_models_keys(model, keys):
    state = engine_state()
    state.model = model
    request = state.request().validate()
    data = json.loads(request.to_json())
    sent_shared = {"instruction", "seed", "variants", "steps", "resolution", "model", "loras", "preserve_detail"}
    assert set(data) == sent_shared | keys
    info = EngineModels.from_json(MODELS).find(model)
    assert data["steps"] == info.default_steps and data["resolution"] == info.default_resolution
    assert {k: data[k] for k in keys} == info.default_options()
    # The flat form reads back into the same request.
    assert EditRequest.from_dict(data, info) == request


def test_the_engine_accepts_what_the_plugin_sends():
    from engine import request as engine_request

    if "options" not in {f.name for f in fields(engine_request.EditParams)}:
        pytest.skip("engine/request.py predates model families (no EditParams.options)")
    try:
        from engine.families import get_family
    except Exception as err:  # pragma: no cover
        pytest.skip(f"engine families not importable: {err}")
    for model in (IP2P, KONTEXT, QWEN):
        state = engine_state()
        state.model = model
        state.variants = 2
        data = json.loads(state.request().validate().to_json())
        parsed = engine_request.EditParams.from_dict(data)
        assert parsed.seed == 3 and parsed.variants == 2 and parsed.model == model
        family = get_family(state.model_info.family)
        resolved = family.resolve_options(parsed.options)  # raises on a key it does not take
        sent = state.request().options
        assert {name: resolved[name] for name in sent} == sent


def test_request_validation_uses_the_published_specs_and_limits():
    state = engine_state()
    with pytest.raises(RequestError) as caught:
        state.request().with_options(text_guidance=31.0).validate()
    assert caught.value.field == "text_guidance" and "30" in str(caught.value)
    with pytest.raises(RequestError) as caught:
        state.request().with_options(guidance=2.0).validate()
    assert caught.value.field == "guidance" and "text_guidance" in str(caught.value)
    with pytest.raises(RequestError) as caught:
        state.request().with_options(scheduler="warp").validate()
    assert caught.value.field == "scheduler"
    state.model = KONTEXT
    with pytest.raises(RequestError) as caught:
        state.request().with_changes(steps=101).validate()  # Kontext's rule: at most 100
    assert caught.value.field == "steps"
    # Limits come from the engine: a stricter engine is obeyed.
    answer = copy.deepcopy(MODELS)
    answer["limits"]["max_variants"] = 4
    state = engine_state(answer)
    state.variants = 5
    with pytest.raises(RequestError) as caught:
        state.request().validate()
    assert caught.value.field == "variants" and "4" in str(caught.value)
    state.variants = 4
    for changes, field in [({"instruction": " "}, "instruction"), ({"instruction": "x" * 1001}, "instruction"),
                           ({"resolution": 32}, "resolution"), ({"seed": -1}, "seed")]:
        with pytest.raises(RequestError) as caught:
            state.request().with_changes(**changes).validate()
        assert caught.value.field == field


# --- Explore -------------------------------------------------------------------------------------


def test_explore_grid_follows_the_specs():
    state = engine_state()
    grid = explore_grid(state.request())
    assert len(grid) == 9 and {r.seed for r in grid} == {3} and {r.variants for r in grid} == {1}
    assert {r.options["text_guidance"] for r in grid} == {5.0, 7.5, 10.0}
    assert {r.options["image_guidance"] for r in grid} == {1.0, 1.5, 2.0}
    assert {r.options["scheduler"] for r in grid} == {"default"}
    state.set_option("image_guidance", 0.0)
    low = explore_grid(state.request())
    assert len(low) == 6 and min(r.options["image_guidance"] for r in low) == 0.0  # clamped
    state.model = KONTEXT
    state.set_option("guidance", 9.5)
    assert [r.options["guidance"] for r in explore_grid(state.request())] == [8.5, 9.5, 10.0]
    assert all(set(r.options) == {"guidance"} for r in explore_grid(state.request()))
    state.model = QWEN  # one axis: true CFG (the negative prompt is text, not an axis)
    cells = explore_grid(state.request())
    assert [r.options["true_cfg_scale"] for r in cells] == [3.0, 4.0, 5.0]
    assert {r.options["negative_prompt"] for r in cells} == {" "}


def test_explore_is_unavailable_without_an_axis():
    answer = copy.deepcopy(MODELS)
    for spec in answer["models"][1]["params"]:
        spec.pop("explore")
    state = engine_state(answer)
    state.model = KONTEXT
    reason = state.explore_unavailable()
    assert reason and "FLUX.1 Kontext" in reason
    with pytest.raises(RequestError) as caught:
        explore_grid(state.request())
    assert caught.value.field == "explore" and str(caught.value) == reason
    assert EditState().explore_unavailable()  # not connected: no model known


def test_the_controller_refuses_explore_with_the_reason(tmp_path):
    from instruct_edit.model.controller import EditController
    from instruct_edit.model.settings import REMOTE, Settings

    answer = copy.deepcopy(MODELS)
    answer["models"][1]["params"][0].pop("explore")
    state = EditState()
    controller = EditController(state, lambda: None, Settings(engine_mode=REMOTE),
                                settings_path=tmp_path / "settings.json")
    state.learn_models(answer)
    state.instruction, state.model = "make it red", KONTEXT
    assert not controller.edit(explore=True)
    assert state.error_field == "explore" and "FLUX.1 Kontext" in state.error


# --- names and provenance ------------------------------------------------------------------------


def test_layer_names_carry_the_familys_parameters():
    state = engine_state()
    assert naming.layer_name(state.request(), 0) == "make it red · s_T 7.5 s_I 1.5 · seed 3"
    state.set_option("scheduler", "euler-a")
    assert naming.layer_name(state.request(), 2) == "make it red · s_T 7.5 s_I 1.5 scheduler euler-a · seed 5"
    state.model = KONTEXT
    assert naming.layer_name(state.request(), 0) == "make it red · guidance 2.5 · seed 3"
    state.model = QWEN
    state.set_option("negative_prompt", "blurry, low quality")
    assert naming.layer_name(state.request(), 0) == "make it red · true CFG 4 · seed 3"
    state.instruction = "a very long instruction " * 5
    assert naming.layer_name(state.request(), 0).startswith("a very long instruction a very long ins… · true CFG 4")
    grid = [naming.layer_name(r, 0) for r in explore_grid(state.request())]
    assert len(set(grid)) == 3  # Explore's cells are told apart by name


def test_provenance_records_the_familys_parameters():
    state = engine_state()
    state.model = QWEN
    state.preset = "lightning-8"
    request = state.request()
    record = provenance.provenance(request, 1, "Dragon", "layer", (1, 2, 3, 4), None, "{id}")
    assert record["model"] == "Qwen-Image-Edit-2511" and record["family"] == "qwen-image-edit"
    assert record["options"] == {"true_cfg_scale": 1.0, "negative_prompt": " "} and record["steps"] == 8
    assert record["seed"] == 4 and record["preset"] == "lightning-8" and record["loras"] == []
    assert json.loads(json.dumps(record)) == record
    text = provenance.describe(record)
    assert "true CFG 1" in text and "Qwen-Image-Edit" in text and "8 steps" in text and "Dragon" in text
    assert "preset lightning-8" in text
    # Records written before model families still read.
    old = {"instruction": "x", "model": "IP2P", "seed": 1, "steps": 20, "text_guidance": 7.5,
           "image_guidance": 1.5, "source_layer": "L"}
    assert "text guidance 7.5, image guidance 1.5" in provenance.describe(old)


# --- per-model state -----------------------------------------------------------------------------


def test_values_are_kept_per_model_and_survive_a_restart():
    state = engine_state()
    assert state.model_info.id == IP2P and state.options["text_guidance"] == 7.5
    state.set_option("text_guidance", 9.0)
    state.steps = 12
    state.model = KONTEXT
    assert state.options == {"guidance": 2.5} and state.steps == 0  # Kontext's defaults
    assert state.non_commercial
    state.set_option("guidance", 4.0)
    state.resolution = 768
    state.model = IP2P
    assert state.options["text_guidance"] == 9.0 and state.steps == 12 and state.resolution == 0
    assert not state.non_commercial
    state.model = KONTEXT
    assert state.options == {"guidance": 4.0} and state.resolution == 768
    # Saved with the settings, back after a restart (before and after the engine answers).
    fresh = EditState()
    fresh.restore(json.loads(json.dumps(state.snapshot())))
    assert fresh.model == KONTEXT and fresh.model_info is None
    fresh.learn_models(copy.deepcopy(MODELS))
    assert fresh.options == {"guidance": 4.0} and fresh.resolution == 768
    fresh.model = IP2P
    assert fresh.options["text_guidance"] == 9.0 and fresh.steps == 12


def test_stored_values_the_engine_no_longer_allows_fall_back_to_defaults():
    state = EditState()
    state.restore({"model": KONTEXT, "model_values": {
        KONTEXT: {"options": {"guidance": 99.0, "gone": 1}, "steps": 5000, "resolution": "big", "preset": "x"},
        IP2P: "garbage"}})
    state.learn_models(copy.deepcopy(MODELS))
    assert state.options == {"guidance": 2.5} and state.steps == 0 and state.resolution == 0
    assert state.preset == ""
    state.model = IP2P
    assert state.options["text_guidance"] == 7.5
    state.model = "no-longer-offered"  # chosen explicitly: kept, the engine will say so
    assert state.model_info is None and state.request().options == {}
    state.learn_models(copy.deepcopy(MODELS))  # a remembered model this engine lacks: its default
    assert state.model == "" and state.model_info.id == IP2P


def test_presets_set_steps_options_and_send_the_preset_id():
    state = engine_state()
    state.model = QWEN
    state.lora_path = "style-a.safetensors"
    assert state.request().steps == 40 and len(state.request().loras) == 1
    state.preset = "lightning-8"
    assert state.steps == 8 and state.options["true_cfg_scale"] == 1.0
    request = state.request()
    # The preset's LoRAs come from the engine's catalogue: the request names the preset only.
    assert request.steps == 8 and request.preset == "lightning-8"
    assert [lo.path for lo in request.loras] == ["style-a.safetensors"]
    assert request.to_dict()["preset"] == "lightning-8"
    state.model = IP2P
    state.model = QWEN
    assert state.preset == "lightning-8" and state.steps == 8  # kept per model, not re-applied
    state.preset = ""
    assert state.steps == 0 and state.options["true_cfg_scale"] == 4.0
    assert state.request().steps == 40 and len(state.request().loras) == 1
    assert state.request().preset is None and "preset" not in state.request().to_dict()


# --- the docker's form -----------------------------------------------------------------------------


class StubController:
    """What EditPanel calls; the panel's own behaviour is under test, not the controller's."""

    def __init__(self, state: EditState) -> None:
        self.state = state
        self.calls: list[str] = []

    def connect_engine(self) -> None:
        self.calls.append("connect")

    def edit(self, explore: bool = False) -> bool:
        self.calls.append("explore" if explore else "edit")
        return True

    def cancel(self) -> None:
        self.calls.append("cancel")

    def edit_this_result(self) -> None:
        self.calls.append("chain")


@pytest.fixture
def panel(qtbot):
    from instruct_edit.ui.panel import EditPanel

    state = engine_state()
    state.connection = CONNECTED
    widget = EditPanel(StubController(state))
    qtbot.addWidget(widget)
    widget.show()
    return widget


def test_the_form_shows_exactly_the_models_controls(panel):
    form, state = panel.params, panel.state
    assert form.labels() == ["Text guidance", "Image guidance", "Scheduler"]
    assert isinstance(form.editor("text_guidance"), QtWidgets.QDoubleSpinBox) and "text_guidance" in form.sliders
    assert isinstance(form.editor("scheduler"), QtWidgets.QComboBox) and "guidance" not in form.editors
    assert form.editor("scheduler").count() == 6
    assert panel.explore_button.isEnabled() and "s_T and s_I" in panel.explore_button.toolTip()
    assert not panel.preset.isVisibleTo(panel) and not panel.licence_note.isVisibleTo(panel)
    assert panel.steps.specialValueText() == "Auto (20)" and panel.steps.value() == 0

    state.resolution = 64  # not in the list: added; not in Kontext's range: not carried over
    assert panel.resolution.currentText() == "64"
    panel.model.setCurrentIndex(panel.model.findData(KONTEXT))
    assert state.model == KONTEXT and form.labels() == ["Guidance"]
    assert panel.resolution.currentIndex() == 0 and panel.resolution.findData(64) < 0
    assert form.editor("guidance").value() == 2.5 and form.editor("guidance").maximum() == 10.0
    assert panel.steps.specialValueText() == "Auto (28)" and panel.steps.maximum() == 100
    assert panel.resolution.itemText(0) == "Auto (1024)" and panel.resolution.findData(128) < 0
    label, tip = panel.model.currentText(), panel.model.toolTip()
    assert "FLUX.1 Kontext" in label and "non-commercial" in label
    assert "Non-Commercial License" in tip and "12 GB" in tip and "33 GB" in tip
    assert panel.licence_note.isVisibleTo(panel) and "Non-commercial" in panel.licence_note.text()
    assert "3 values of guidance" in panel.explore_button.toolTip()

    panel.model.setCurrentIndex(panel.model.findData(QWEN))
    assert form.labels() == ["True CFG", "Negative prompt"]
    assert isinstance(form.editor("negative_prompt"), QtWidgets.QLineEdit)
    assert form.editor("negative_prompt").maxLength() == 1000
    assert panel.preset.isVisibleTo(panel) and panel.preset.count() == 2


def test_form_values_persist_per_model_across_switches(panel, qtbot):
    form, state = panel.params, panel.state
    form.editor("text_guidance").setValue(9.5)
    assert state.options["text_guidance"] == 9.5 and form.sliders["text_guidance"].value() == 19
    form.sliders["image_guidance"].setValue(40)  # slider ticks of 0.05
    assert state.options["image_guidance"] == 2.0 and form.editor("image_guidance").value() == 2.0
    form.editor("scheduler").setCurrentIndex(form.editor("scheduler").findData("ddim"))
    panel.steps.setValue(15)
    panel.model.setCurrentIndex(panel.model.findData(QWEN))
    qtbot.keyClicks(form.editor("negative_prompt"), "blurry")
    assert state.options["negative_prompt"] == " blurry"
    panel.preset.setCurrentIndex(panel.preset.findData("lightning-8"))
    assert panel.steps.value() == 8 and form.editor("true_cfg_scale").value() == 1.0
    panel.model.setCurrentIndex(panel.model.findData(IP2P))
    assert form.editor("text_guidance").value() == 9.5 and form.editor("image_guidance").value() == 2.0
    assert form.editor("scheduler").currentText() == "ddim" and panel.steps.value() == 15
    assert json.loads(state.request().to_json())["scheduler"] == "ddim"
    panel.model.setCurrentIndex(panel.model.findData(QWEN))
    assert form.editor("negative_prompt").text() == " blurry" and panel.preset.currentData() == "lightning-8"
    assert panel.steps.value() == 8


def test_the_form_follows_state_changes_and_a_model_without_parameters(panel):
    panel.state.set_option("text_guidance", 3.0)
    assert panel.params.editor("text_guidance").value() == 3.0
    answer = copy.deepcopy(MODELS)
    answer["models"].append({"id": "plain", "name": "Plain", "family": "x", "params": []})
    panel.state.learn_models(answer)
    panel.model.setCurrentIndex(panel.model.findData("plain"))
    assert panel.params.labels() == [] and not panel.params.isVisibleTo(panel)
    assert not panel.explore_button.isEnabled() and "Explore" in panel.explore_button.toolTip()
    assert panel.steps.specialValueText() == "Auto"
    assert set(json.loads(panel.state.request().to_json())) <= set(SHARED_FIELDS)
