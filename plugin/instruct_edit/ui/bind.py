"""Two-way links between an observable field and a widget."""

from __future__ import annotations

from typing import Any

from ..model.observable import Observable
from ..qt import QtWidgets


def bind_spin(state: Observable, name: str, spin: QtWidgets.QAbstractSpinBox) -> None:
    state.on_change(name, lambda value: spin.value() != value and spin.setValue(value), owner=spin)
    spin.valueChanged.connect(lambda value: setattr(state, name, value))


def bind_check(state: Observable, name: str, box: QtWidgets.QAbstractButton) -> None:
    state.on_change(name, lambda value: box.isChecked() != bool(value) and box.setChecked(bool(value)),
                    owner=box)
    box.toggled.connect(lambda value: setattr(state, name, bool(value)))


def bind_combo_data(state: Observable, name: str, combo: QtWidgets.QComboBox) -> None:
    """The combo's item data is the field's value."""

    def show(value: Any) -> None:
        index = combo.findData(value)
        if index >= 0 and index != combo.currentIndex():
            combo.setCurrentIndex(index)

    state.on_change(name, show, owner=combo)
    combo.currentIndexChanged.connect(
        lambda index: index >= 0 and setattr(state, name, combo.itemData(index)))


def link_slider(slider: QtWidgets.QSlider, spin: QtWidgets.QDoubleSpinBox, scale: float) -> None:
    """A slider (coarse: `scale` ticks per unit) following a spin box (exact), both ways."""

    def show(value: float) -> None:
        tick = round(value * scale)
        if slider.value() != tick:
            slider.setValue(tick)

    spin.valueChanged.connect(show)
    slider.valueChanged.connect(
        lambda tick: abs(spin.value() - tick / scale) >= 0.5 / scale and spin.setValue(tick / scale))
    show(spin.value())
