"""ParamsForm: the selected model's own parameters, as the engine published them.

One row per ParamSpec: float → slider + spin box, int → spin box, choice → combo box,
bool → check box, text → line edit. The form is rebuilt when the model changes and shows
`state.options`; editing a control sets that option. No family is known here by name.
"""

from __future__ import annotations

from typing import Any

from ..model.state import EditState
from ..qt import Qt, QtWidgets
from ..specs import ModelInfo, ParamSpec, format_value
from .bind import link_slider

_INT_RANGE = (-(2**31), 2**31 - 1)
_FLOAT_RANGE = (-1e6, 1e6)


def _decimals(step: float | None) -> int:
    if not step:
        return 2
    text = f"{step:g}"
    return max(1, min(4, len(text.split(".")[1]) if "." in text else 0))


def _slider_scale(spec: ParamSpec) -> float:
    """Ticks per unit: one per `step`, else about a hundred over the range."""
    if spec.step:
        return 1.0 / spec.step
    span = (spec.maximum or 0.0) - (spec.minimum or 0.0)
    return 100.0 if span <= 5 else 10.0 if span <= 100 else 1.0


def tooltip(spec: ParamSpec) -> str:
    lines = [spec.label + (f" ({spec.short})" if spec.short and spec.short not in spec.label else "")]
    if spec.help:
        lines.append(spec.help)
    facts = [f"default {format_value(spec.default)}"]
    if spec.minimum is not None and spec.maximum is not None:
        facts.append(f"from {spec.minimum:g} to {spec.maximum:g}")
    if spec.explore:
        facts.append(f"Explore steps it by {spec.explore:g}")
    lines.append(", ".join(facts).capitalize() + ".")
    return "\n".join(lines)


class ParamsForm(QtWidgets.QWidget):
    """Rows for `state.model_info.params`; `editor(name)` is each row's value widget."""

    def __init__(self, state: EditState, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.form = QtWidgets.QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.editors: dict[str, QtWidgets.QWidget] = {}
        self.sliders: dict[str, QtWidgets.QSlider] = {}
        self.specs: dict[str, ParamSpec] = {}
        self._info: ModelInfo | None = None
        self._built = False
        state.on_change("model_info", self.rebuild, owner=self)
        state.on_change("options", self.show_values, owner=self)

    # --- building ------------------------------------------------------------------------

    def rebuild(self, info: ModelInfo | None) -> None:
        if self._built and info == self._info:
            return
        self._info, self._built = info, True
        while self.form.rowCount():
            self.form.removeRow(0)
        self.editors, self.sliders, self.specs = {}, {}, {}
        for spec in info.params if info else ():
            self.specs[spec.name] = spec
            self.form.addRow(spec.label, self._row(spec))
        self.setVisible(bool(self.specs))
        self.show_values(self.state.options)

    def _row(self, spec: ParamSpec) -> QtWidgets.QWidget:
        value = self.state.options.get(spec.name, spec.default)
        tip = tooltip(spec)
        name = spec.name
        row: QtWidgets.QWidget
        if spec.kind == "float":
            spin = QtWidgets.QDoubleSpinBox()
            spin.setDecimals(_decimals(spec.step))
            lo = spec.minimum if spec.minimum is not None else _FLOAT_RANGE[0]
            hi = spec.maximum if spec.maximum is not None else _FLOAT_RANGE[1]
            spin.setRange(lo, hi)
            spin.setSingleStep(spec.step or 0.1)
            spin.setValue(float(value))
            spin.valueChanged.connect(lambda v: self._edited(name, round(float(v), 4)))
            editor = row = spin
            if spec.minimum is not None and spec.maximum is not None and spec.maximum > spec.minimum:
                row = QtWidgets.QWidget()
                box = QtWidgets.QHBoxLayout(row)
                box.setContentsMargins(0, 0, 0, 0)
                slider = QtWidgets.QSlider(Qt.Orientation.Horizontal)
                scale = _slider_scale(spec)
                slider.setRange(round(spec.minimum * scale), round(spec.maximum * scale))
                slider.setToolTip(tip)
                link_slider(slider, spin, scale)
                box.addWidget(slider, 1)
                box.addWidget(spin)
                self.sliders[name] = slider
        elif spec.kind == "int":
            spin = QtWidgets.QSpinBox()
            lo = int(spec.minimum) if spec.minimum is not None else _INT_RANGE[0]
            hi = int(spec.maximum) if spec.maximum is not None else _INT_RANGE[1]
            spin.setRange(max(lo, _INT_RANGE[0]), min(hi, _INT_RANGE[1]))
            spin.setSingleStep(max(1, int(spec.step or 1)))
            spin.setValue(int(value))
            spin.valueChanged.connect(lambda v: self._edited(name, int(v)))
            editor = row = spin
        elif spec.kind == "choice":
            combo = QtWidgets.QComboBox()
            for choice in spec.choices:
                combo.addItem(choice, choice)
            combo.setCurrentIndex(max(0, combo.findData(value)))
            combo.currentIndexChanged.connect(
                lambda i, c=combo: i >= 0 and self._edited(name, c.itemData(i)))
            editor = row = combo
        elif spec.kind == "bool":
            box = QtWidgets.QCheckBox()
            box.setChecked(bool(value))
            box.toggled.connect(lambda v: self._edited(name, bool(v)))
            editor = row = box
        else:
            line = QtWidgets.QLineEdit()
            if spec.max_length is not None:
                line.setMaxLength(spec.max_length)
            line.setText(str(value))
            line.textChanged.connect(lambda v: self._edited(name, str(v)))
            editor = row = line
        editor.setToolTip(tip)
        editor.setObjectName(f"param_{name}")
        self.editors[name] = editor
        return row

    # --- values ----------------------------------------------------------------------------

    def _edited(self, name: str, value: Any) -> None:
        if name in self.specs:
            self.state.set_option(name, value)

    def show_values(self, options: dict[str, Any]) -> None:
        for name, editor in self.editors.items():
            spec = self.specs[name]
            value = options.get(name, spec.default)
            if isinstance(editor, QtWidgets.QDoubleSpinBox):
                if abs(editor.value() - float(value)) > 1e-9:
                    editor.setValue(float(value))
            elif isinstance(editor, QtWidgets.QSpinBox):
                if editor.value() != int(value):
                    editor.setValue(int(value))
            elif isinstance(editor, QtWidgets.QComboBox):
                index = editor.findData(value)
                if index >= 0 and index != editor.currentIndex():
                    editor.setCurrentIndex(index)
            elif isinstance(editor, QtWidgets.QCheckBox):
                if editor.isChecked() != bool(value):
                    editor.setChecked(bool(value))
            elif isinstance(editor, QtWidgets.QLineEdit) and editor.text() != str(value):
                editor.setText(str(value))

    # --- for tests and the panel ---------------------------------------------------------------

    def editor(self, name: str) -> QtWidgets.QWidget:
        return self.editors[name]

    def labels(self) -> list[str]:
        """The rows' labels, top to bottom."""
        out = []
        for row in range(self.form.rowCount()):
            item = self.form.itemAt(row, QtWidgets.QFormLayout.ItemRole.LabelRole)
            if item is not None and item.widget() is not None:
                out.append(item.widget().text())
        return out
