"""The Train tab's state and logic: datasets of pairs from the painter's layers, training jobs.

- `TrainingState` (observable, no widgets): the datasets, the chosen dataset's pairs, the
  layers offered as before/after, what the engine can train (`/v1/training-options`), the
  trainings it knows (`/v1/trainings`) and the one shown (loss points, validations, time left).
- `TrainingController`: adds/removes pairs (training_pair.py writes the dataset folder, in the
  training package's pairs format), starts/follows/cancels/resumes trainings over the
  connection the edit side uses, and when a training is done refreshes the engine's LoRA
  list so the new LoRA is selectable in the Edit tab at once.

A dataset goes to an engine on this machine as its folder path (nothing is copied); to an
engine elsewhere as a zip of the folder (metadata.jsonl + the images it names).
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import image as px
from ..client.errors import ApiError
from ..client.trainings import TrainingOptions, TrainingStatus, statuses_from_json
from ..krita_document import KritaDocument, UnsupportedDocument
from ..qt import QImage, QObject, QTimer
from ..training_pair import PairEntry, dataset_zip, list_pairs, remove_pair, save_pair
from . import settings as settings_module
from .observable import Field, Observable
from .state import CONNECTED

#: Points kept for the loss curve (the engine thins its own list to 500; events add more).
MAX_LOSS_POINTS = 2000
#: A dataset name: letters, digits, space, dot, dash, underscore (also a training's name rule).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9 _.-]{1,64}$")
#: After an event stream ends early (not in a final state), look again after this long.
RETRY_MS = 2000


class TrainingState(Observable):
    # Datasets and pairs
    datasets_root = Field("")  # the folder holding one subfolder per dataset
    datasets = Field([])  # [(label, folder)]
    dataset = Field("")  # the chosen dataset's folder ("" = none)
    pairs = Field([])  # [PairEntry] of the chosen dataset
    layers = Field([])  # [(layer id, name)] of the current document's paint layers
    before_layer = Field("")
    after_layer = Field("")
    pair_instruction = Field("")

    # What the engine can train
    options = Field(TrainingOptions())
    available = Field(True)  # False: this engine has no training routes
    base_model = Field("")
    preset = Field("")
    name = Field("")  # the new LoRA's name ("" = the dataset's name)
    max_steps = Field(0)  # 0 = the preset's steps; else sent as overrides.max_steps
    #: Further overrides sent as they are (the contract's range-checked names; scripts, tests).
    overrides = Field({})

    # Trainings
    trainings = Field([])  # [TrainingStatus] newest first
    current = Field(None)  # the TrainingStatus shown (the running one, or the one picked)
    validation_image = Field(None)  # the latest validation grid of `current` (QImage)
    validation_step = Field(0)
    starting = Field(False)  # a start/resume request is on its way

    error = Field("")
    message = Field("")

    PERSISTED = ("dataset", "base_model", "preset")

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PERSISTED}

    def restore(self, data: dict[str, Any]) -> None:
        for name in self.PERSISTED:
            if isinstance(data.get(name), str):
                setattr(self, name, data[name])

    @property
    def preset_info(self) -> Any:
        return self.options.preset(self.preset)

    @property
    def can_start(self) -> bool:
        current = self.current
        return not self.starting and not (current is not None and current.active)


class TrainingController(QObject):
    def __init__(
        self,
        edit_controller: Any,
        state: TrainingState | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.edit = edit_controller
        self.state = state or TrainingState()
        self._stream: Any = None
        self._watching: str | None = None
        self._fetching_validation: tuple[str, int] | None = None
        saved = getattr(edit_controller.settings, "training", {}) or {}
        self.state.restore(saved)
        #: The base model was chosen by the painter (now or in an earlier session): kept.
        self._model_chosen = bool(saved.get("base_model"))
        self._layers_chosen = False
        self.refresh_datasets()
        edit_controller.state.on_change("connection", self._connection_changed, owner=self)
        edit_controller.state.on_change(
            "engine_models", lambda _v: self._pick_base_model(), now=False, owner=self
        )

    # --- plumbing ------------------------------------------------------------------------

    @property
    def connection(self) -> Any:
        return self.edit.connection

    @property
    def client(self) -> Any:
        return self.edit.connection.client

    def _guard(self, function: Callable[..., None]) -> Callable[..., None]:
        """A callback Qt calls: never let an exception escape into the event loop."""

        def call(*args: Any) -> None:
            try:
                function(*args)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                self.state.error = f"The plugin could not use the engine's answer ({err})."

        return call

    def _refuse(self, message: str) -> bool:
        self.state.error, self.state.message = message, ""
        return False

    def _save(self) -> None:
        self.edit.settings.training = self.state.snapshot()
        with contextlib.suppress(OSError):
            self.edit._save_settings()

    # --- datasets --------------------------------------------------------------------------

    def refresh_datasets(self) -> None:
        """The dataset list: subfolders of the datasets folder (+ the engine's, on loopback)."""
        state = self.state
        root = settings_module.datasets_folder(self.edit.settings)
        state.datasets_root = str(root)
        found: list[tuple[str, str]] = []
        with contextlib.suppress(OSError):
            for folder in sorted(
                p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            ):
                found.append((folder.name, str(folder)))
        if self.connection.client is not None and self.connection.loopback:
            mine = {folder for _, folder in found}
            for item in state.options.datasets:
                if item.folder not in mine:
                    found.append(
                        (f"{Path(item.folder).name} (engine, {item.pairs} pairs)", item.folder)
                    )
        state.datasets = found
        if state.dataset not in {folder for _, folder in found}:
            state.dataset = found[0][1] if found else ""
        self.refresh_pairs()

    def new_dataset(self, name: str) -> bool:
        """Create (or pick, if it exists) the dataset `name` under the datasets folder."""
        name = name.strip()
        if not NAME_PATTERN.match(name) or name.startswith("."):
            return self._refuse(
                "A dataset name uses 1–64 letters, digits, spaces, dots, dashes or "
                "underscores (e.g. “inking”)."
            )
        folder = Path(self.state.datasets_root) / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return self._refuse(
                f"Could not create the dataset folder {folder}: {err.strerror or err}. "
                "Choose another datasets folder in Settings."
            )
        self.state.dataset = str(folder)
        self.refresh_datasets()
        self.state.error, self.state.message = "", f"Dataset “{name}” is ready: add pairs to it."
        self._save()
        return True

    def select_dataset(self, folder: str) -> None:
        if folder != self.state.dataset:
            self.state.dataset = folder
            self._save()
        self.refresh_pairs()

    def refresh_pairs(self) -> None:
        folder = self.state.dataset
        self.state.pairs = list_pairs(folder) if folder else []

    def pair_paths(self, entry: PairEntry) -> tuple[Path, Path]:
        return entry.paths(self.state.dataset)

    # --- pairs from layers -----------------------------------------------------------------

    def _document(self) -> KritaDocument | None:
        try:
            return self.edit.document_provider()
        except Exception:  # a document being closed
            return None

    def refresh_layers(self) -> None:
        """The current document's paint layers (the docker polls this while the tab shows).

        Until the painter picks layers, the choice follows the current layer (the one below
        it → before, it → after); a pick is kept while both layers exist.
        """
        state = self.state
        document = self._document()
        try:
            layers = document.paint_layers() if document is not None else []
            defaults = document.default_pair_layers() if document is not None else (None, None)
        except Exception:  # a document being closed; the next poll will tell
            return
        if layers != state.layers:
            state.layers = layers
        ids = {node_id for node_id, _ in layers}
        if self._layers_chosen and state.before_layer in ids and state.after_layer in ids:
            return
        self._layers_chosen = False
        state.before_layer, state.after_layer = defaults[0] or "", defaults[1] or ""

    def choose_layer(self, role: str, layer_id: str) -> None:
        """The painter picked the before or after layer: kept from now on (while it exists)."""
        if role not in ("before", "after"):
            raise ValueError(role)
        setattr(self.state, f"{role}_layer", layer_id or "")
        self._layers_chosen = True

    def add_pair(self) -> bool:
        """Store the chosen layers (the selected region of both, if any) as a pair."""
        state = self.state
        state.error, state.message = "", ""
        instruction = state.pair_instruction.strip()
        if not state.dataset:
            return self._refuse("Choose or create a dataset first (New dataset…).")
        if not instruction:
            return self._refuse(
                "Type the instruction that turns the “before” into the “after” "
                "(e.g. “ink the sketch”)."
            )
        if not state.before_layer or not state.after_layer:
            return self._refuse("Choose the “before” and the “after” layer.")
        document = self._document()
        if document is None:
            return self._refuse("Open a document first.")
        try:
            before, after, area = document.read_layer_pair(state.before_layer, state.after_layer)
            save_pair(state.dataset, instruction, before, after, area.width, area.height)
        except UnsupportedDocument as err:
            return self._refuse(str(err))
        except (OSError, ValueError) as err:
            return self._refuse(f"Could not save the pair in {state.dataset}: {err}")
        self.refresh_pairs()
        state.message = (
            f"Added the pair “{instruction}” ({area.width}×{area.height}); "
            f"the dataset has {len(state.pairs)} pairs."
        )
        return True

    def remove_pair(self, entry: PairEntry) -> bool:
        state = self.state
        state.error, state.message = "", ""
        try:
            remove_pair(state.dataset, entry)
        except (OSError, ValueError) as err:
            self.refresh_pairs()
            return self._refuse(f"Could not remove the pair: {err}")
        self.refresh_pairs()
        state.message = f"Removed the pair “{entry.edit_prompt}”."
        return True

    # --- what the engine offers ------------------------------------------------------------

    def _connection_changed(self, status: str) -> None:
        if status == CONNECTED:
            self.fetch_options()
            self.fetch_trainings()
        else:
            self._stop_watching()

    def fetch_options(self) -> None:
        client = self.client
        if client is None:
            return

        def arrived(answer: Any) -> None:
            state = self.state
            options = TrainingOptions.from_json(answer)
            state.available = True
            state.options = options
            self._pick_base_model()
            if not options.preset(state.preset):
                fallback = options.preset("balanced") or (
                    options.presets[0] if options.presets else None
                )
                state.preset = fallback.id if fallback else ""
            self.refresh_datasets()

        def failed(err: ApiError) -> None:
            if err.status == 404:
                self.state.available = False
                self.state.error = (
                    "This engine cannot train (it has no training routes): update "
                    "instruct-edit on the engine's machine."
                )
            else:
                self.state.error = err.message

        client.training_options(self._guard(arrived), self._guard(failed))

    def choose_base_model(self, model_id: str) -> None:
        """The painter picked the model to fine-tune (kept over the automatic choice)."""
        if model_id and model_id != self.state.base_model:
            self.state.base_model = model_id
            self._model_chosen = True
            self._save()

    def _pick_base_model(self) -> None:
        """The model to fine-tune unless the painter chose one: the Edit tab's model, else the
        engine's default, else one whose weights are already on the engine's machine (a hub
        model not downloaded yet would fail the training), else the first trainable one."""
        state = self.state
        trainable = [m.id for m in state.options.trainable]
        if not trainable:
            state.base_model = ""
            return
        if state.base_model in trainable and self._model_chosen:
            return
        catalogue = self.edit.state.engine_models
        local = [
            i
            for i in trainable
            if (info := catalogue.find(i)) is not None and info.available_locally is True
        ]
        for candidate in (self.edit.state.model, catalogue.default_model, *local, trainable[0]):
            if candidate in trainable:
                state.base_model = candidate
                return

    def fetch_trainings(self) -> None:
        client = self.client
        if client is None:
            return

        def arrived(answer: Any) -> None:
            state = self.state
            trainings = statuses_from_json(answer)
            current = state.current
            if current is not None and self._watching == current.id:
                # The followed training's event stream is newer than this list (which may
                # have been read before the last events): keep what the stream said.
                trainings = [current if t.id == current.id else t for t in trainings]
                state.trainings = trainings
                return
            state.trainings = trainings
            active = next((t for t in trainings if t.active), None)
            if active is not None:
                self._show(active)
                self.watch(active.id)
            elif current is not None:
                fresh = next((t for t in trainings if t.id == current.id), None)
                if fresh is not None:
                    self._show(fresh)
            elif trainings:
                self._show(trainings[0])

        client.trainings(self._guard(arrived), lambda err: None)

    # --- starting, following, stopping -----------------------------------------------------

    def training_params(self) -> dict[str, Any]:
        state = self.state
        name = state.name.strip() or Path(state.dataset).name
        params: dict[str, Any] = {"name": name, "model": state.base_model, "preset": state.preset}
        overrides = dict(state.overrides)
        if state.max_steps > 0:
            overrides["max_steps"] = int(state.max_steps)
        if overrides:
            params["overrides"] = overrides
        return params

    def start(self) -> bool:
        """Start a training of the chosen dataset; False (with state.error) when it can't."""
        state = self.state
        state.error, state.message = "", ""
        if not self.connection.ready:
            return self._refuse("The engine is not connected yet; wait for it, or check Settings.")
        if not state.available:
            return self._refuse(
                "This engine cannot train: update instruct-edit on the engine's machine."
            )
        if not state.can_start:
            return self._refuse("A training is already running; wait for it or cancel it.")
        if not state.dataset:
            return self._refuse("Choose or create a dataset first.")
        self.refresh_pairs()
        needed = state.options.min_pairs
        if len(state.pairs) < needed:
            return self._refuse(
                f"The dataset has {len(state.pairs)} pairs; training needs at least "
                f"{needed}. Add more pairs (see the painter's guide: 10–30 is a good start)."
            )
        if not state.base_model:
            models = state.options.models
            why = "; ".join(f"{m.id}: {m.why_not}" for m in models if m.why_not)
            return self._refuse(
                "The engine offers no model it can fine-tune" + (f" ({why})." if why else ".")
            )
        if not state.options.preset(state.preset):
            return self._refuse("Choose a preset (quick, balanced or thorough).")
        params = self.training_params()
        if not NAME_PATTERN.match(params["name"]):
            return self._refuse(
                "The LoRA name uses 1–64 letters, digits, spaces, dots, dashes or underscores."
            )
        self._save()
        if self.connection.loopback:
            self._post(params, folder=str(Path(state.dataset).resolve()))
        else:
            self._post_zip(params)
        return True

    def _post_zip(self, params: dict[str, Any]) -> None:
        state = self.state
        try:
            data = dataset_zip(state.dataset, state.options.max_dataset_mb * 2**20)
        except (OSError, ValueError) as err:
            self._refuse(f"Could not pack the dataset: {err}")
            return
        state.message = f"Uploading the dataset ({len(data) / 2**20:.1f} MB)…"
        self._post(params, data=data)

    def _post(
        self, params: dict[str, Any], folder: str | None = None, data: bytes | None = None
    ) -> None:
        client = self.client
        self.state.starting = True

        def accepted(answer: Any) -> None:
            self.state.starting = False
            status = TrainingStatus.from_json(answer)
            if status is None:
                self.state.error = (
                    "The engine accepted the training but sent no id; update the engine."
                )
                return
            self.state.message = f"Training “{status.name}” started."
            self._show(status, new=True)
            self.watch(status.id)
            self.fetch_trainings()

        def refused(err: ApiError) -> None:
            self.state.starting = False
            if folder is not None and err.status == 403 and err.kind != "auth":
                # The engine does not see this machine's folders (e.g. behind a proxy): upload.
                self._post_zip(params)
                return
            self.state.error = err.message

        client.start_training(
            params,
            self._guard(accepted),
            self._guard(refused),
            dataset_folder=folder,
            dataset_zip=data,
        )

    def cancel(self) -> None:
        current, client = self.state.current, self.client
        if current is None or client is None or not current.active:
            return

        def answered(answer: Any) -> None:
            status = TrainingStatus.from_json(answer)
            if status is not None:
                self._show(status)
            self.state.message = (
                "Training cancelled; the last checkpoint is kept (Resume continues it)."
            )

        client.cancel_training(
            current.id,
            self._guard(answered),
            self._guard(lambda err: setattr(self.state, "error", err.message)),
        )

    def resume(self, training_id: str | None = None) -> bool:
        state = self.state
        state.error, state.message = "", ""
        training_id = training_id or (state.current.id if state.current else None)
        client = self.client
        if training_id is None or client is None:
            return self._refuse("Choose a training to resume.")
        if not state.can_start:
            return self._refuse("A training is already running; wait for it or cancel it.")
        state.starting = True

        def accepted(answer: Any) -> None:
            state.starting = False
            status = TrainingStatus.from_json(answer)
            if status is not None:
                state.message = f"Training “{status.name}” continues from its last checkpoint."
                self._show(status)
                self.watch(status.id)
                self.fetch_trainings()

        def refused(err: ApiError) -> None:
            state.starting = False
            state.error = err.message

        client.resume_training(training_id, self._guard(accepted), self._guard(refused))
        return True

    def select_training(self, training_id: str) -> None:
        found = next((t for t in self.state.trainings if t.id == training_id), None)
        if found is not None:
            self._show(found, new=True)
            if found.active:
                self.watch(found.id)

    def watch(self, training_id: str) -> None:
        """Follow a training's events (progress, validation, state) until a final state."""
        client = self.client
        if client is None or (self._watching == training_id and self._stream is not None):
            return
        self._stop_watching()
        self._watching = training_id

        def event(name: str, data: Any) -> None:
            current = self.state.current
            if current is None or current.id != training_id or not isinstance(data, dict):
                if name == "state":
                    status = TrainingStatus.from_json(data)
                    if status is not None and status.id == training_id:
                        self._show(status)
                return
            if name == "progress":
                self._progress(current, data)
            elif name == "validation":
                step, index = data.get("step"), data.get("index")
                if isinstance(index, int) and not isinstance(index, bool):
                    step = step if isinstance(step, int) else current.step
                    if (step, index) not in current.validations:
                        self._show(
                            replace(current, validations=(*current.validations, (step, index)))
                        )
            elif name == "state":
                status = TrainingStatus.from_json(data)
                if status is not None:
                    self._show(status)

        def ended(error: ApiError | None) -> None:
            if self._watching != training_id:
                return
            self._stream = None
            self._watching = None
            # The stream ends after a final state; otherwise (engine gone, proxy timeout)
            # read the status, and follow again if it still runs.
            self._check_after_stream(training_id)

        self._stream = client.training_events(training_id, self._guard(event), self._guard(ended))

    def _check_after_stream(self, training_id: str) -> None:
        client = self.client
        if client is None:
            return

        def status(answer: Any) -> None:
            found = TrainingStatus.from_json(answer)
            if found is None:
                return
            self._show(found)
            if found.active:
                QTimer.singleShot(RETRY_MS, lambda: self._rewatch(training_id))
            else:
                self.fetch_trainings()

        client.training(training_id, self._guard(status), lambda err: None)

    def _rewatch(self, training_id: str) -> None:
        current = self.state.current
        if (
            current is not None
            and current.id == training_id
            and current.active
            and self._watching is None
        ):
            self.watch(training_id)

    def _stop_watching(self) -> None:
        stream, self._stream, self._watching = self._stream, None, None
        if stream is not None:
            stream.close()

    def _progress(self, current: TrainingStatus, data: dict[str, Any]) -> None:
        step = data.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        loss = current.loss
        value = data.get("loss")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A resumed training repeats the steps after its last checkpoint: their new
            # points replace the old ones.
            loss = (*(point for point in loss if point[0] < step), (step, float(value)))
            if len(loss) > MAX_LOSS_POINTS:
                loss = loss[::2]  # thin evenly; the curve's shape stays
        max_steps = data.get("max_steps")
        eta = data.get("eta_s")
        self._show(
            replace(
                current,
                step=step,
                loss=loss,
                max_steps=max_steps
                if isinstance(max_steps, int) and not isinstance(max_steps, bool)
                else current.max_steps,
                eta_s=float(eta)
                if isinstance(eta, (int, float)) and not isinstance(eta, bool)
                else None,
                state="running" if current.state in ("queued", "paused") else current.state,
            )
        )

    def _show(self, status: TrainingStatus, new: bool = False) -> None:
        """Make `status` the shown training; fetch a validation grid that is new; on done,
        refresh the engine's LoRA list."""
        state = self.state
        previous = state.current
        if new or previous is None or previous.id != status.id:
            state.validation_image, state.validation_step = None, 0
        was_done = previous is not None and previous.id == status.id and previous.state == "done"
        state.current = status
        state.trainings = (
            [status if t.id == status.id else t for t in state.trainings]
            if any(t.id == status.id for t in state.trainings)
            else [status, *state.trainings]
        )
        if status.validations:
            self._fetch_validation(status.id, *status.validations[-1])
        if status.state == "done" and not was_done and status.lora_path:
            self.connection.refresh_models()
            state.message = (
                f"Training “{status.name}” is done: the LoRA {status.lora_path} is in the "
                "Edit tab's LoRA list."
            )
        elif status.state == "failed" and status.error:
            state.error = f"Training “{status.name}” failed: {status.error}"
        elif (
            status.state == "interrupted"
            and previous is not None
            and previous.id == status.id
            and previous.state != "interrupted"
        ):
            state.error = f"Training “{status.name}” was interrupted (the engine stopped)." + (
                " Resume continues from the last checkpoint." if status.can_resume() else ""
            )

    def _fetch_validation(self, training_id: str, step: int, index: int) -> None:
        state = self.state
        client = self.client
        if (
            client is None
            or (state.validation_image is not None and state.validation_step >= step)
            or self._fetching_validation == (training_id, index)
        ):
            return
        self._fetching_validation = (training_id, index)

        def arrived(data: bytes) -> None:
            self._fetching_validation = None
            current = state.current
            if current is None or current.id != training_id:
                return
            try:
                picture: QImage = px.decode_png(data)
            except ValueError:
                return  # not a PNG: keep showing the previous grid
            if step >= state.validation_step:
                state.validation_step = step
                state.validation_image = picture

        def failed(_err: ApiError) -> None:
            self._fetching_validation = None

        client.validation_image(training_id, index, self._guard(arrived), self._guard(failed))

    # --- the result in the Edit tab --------------------------------------------------------

    def use_lora(self) -> bool:
        """Choose the shown training's LoRA (and its base model) in the Edit tab."""
        current = self.state.current
        if current is None or current.state != "done" or not current.lora_path:
            return self._refuse("The training is not done yet: its LoRA is not available.")
        edit_state = self.edit.state
        if current.model and edit_state.engine_models.find(current.model) is not None:
            edit_state.model = current.model
        if current.lora_path not in edit_state.loras:
            edit_state.loras = [*edit_state.loras, current.lora_path]
        edit_state.lora_path = current.lora_path
        self.state.message = f"The Edit tab now uses the LoRA “{current.name}”."
        return True

    def shutdown(self) -> None:
        self._stop_watching()
