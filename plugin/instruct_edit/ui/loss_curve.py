"""LossCurve: a small widget drawing a training's loss points with QPainter (no plot library)."""

from __future__ import annotations

from typing import Any

from ..qt import QColor, QPainter, QtCore, QtGui, QtWidgets


class LossCurve(QtWidgets.QWidget):
    """Loss over steps: a line through the points, the step range on x, the loss range on y."""

    MARGIN = 6

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.points: list[tuple[int, float]] = []
        self.max_steps = 0
        self.setMinimumHeight(80)
        self.setSizePolicy(
            QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Fixed
        )
        self.setToolTip("Training loss per step (lower is better; it is noisy, the trend matters)")

    def set_points(self, points: Any, max_steps: int = 0) -> None:
        self.points = [(int(s), float(v)) for s, v in points]
        self.max_steps = int(max_steps)
        self.update()

    def sizeHint(self) -> QtCore.QSize:
        return QtCore.QSize(240, 90)

    def polyline(self) -> list[tuple[float, float]]:
        """The points in widget coordinates (what paintEvent draws; tests read it)."""
        if not self.points:
            return []
        m = self.MARGIN
        width, height = max(1, self.width() - 2 * m), max(1, self.height() - 2 * m - 12)
        first = min(s for s, _ in self.points)
        last = max(self.max_steps, max(s for s, _ in self.points))
        low = min(v for _, v in self.points)
        high = max(v for _, v in self.points)
        span_x = max(1, last - first)
        span_y = (high - low) or 1.0
        return [
            (m + (s - first) / span_x * width, m + (high - v) / span_y * height)
            for s, v in self.points
        ]

    def paintEvent(self, event: Any) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        palette = self.palette()
        painter.fillRect(self.rect(), palette.color(QtGui.QPalette.ColorRole.Base))
        text_colour = palette.color(QtGui.QPalette.ColorRole.Text)
        points = self.polyline()
        if not points:
            painter.setPen(text_colour)
            painter.drawText(self.rect(), QtCore.Qt.AlignmentFlag.AlignCenter, "Loss appears here")
            painter.end()
            return
        pen = QtGui.QPen(QColor("#4a90d9"))
        pen.setWidthF(1.5)
        painter.setPen(pen)
        path = QtGui.QPainterPath()
        path.moveTo(*points[0])
        for x, y in points[1:]:
            path.lineTo(x, y)
        painter.drawPath(path)
        painter.setPen(text_colour)
        step, loss = self.points[-1]
        painter.drawText(self.MARGIN, self.height() - 4, f"step {step} · loss {loss:.4g}")
        painter.end()
