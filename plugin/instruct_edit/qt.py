"""The one place that chooses the Qt binding: PyQt6 (Krita 6) or PyQt5 (Krita 5).

Every other module imports Qt names from here. Enum members are always written in their
scoped form (`QImage.Format.Format_ARGB32`), which both PyQt5 5.15 and PyQt6 accept.
Set INSTRUCT_EDIT_QT=pyqt5 or pyqt6 to force a binding (tests run under both).
"""

from __future__ import annotations

import os
import sys

_FORCED = os.environ.get("INSTRUCT_EDIT_QT", "").strip().lower()


if _FORCED not in ("", "pyqt5", "pyqt6"):
    raise ImportError(f"INSTRUCT_EDIT_QT must be 'pyqt5' or 'pyqt6' (got {_FORCED!r})")

# Inside Krita the binding Krita itself uses is already imported: Krita 5 has PyQt5
# loaded, so PyQt6 is tried only when forced or when PyQt5 is not in use.
if _FORCED == "pyqt6" or (not _FORCED and "PyQt5.QtCore" not in sys.modules):
    try:
        from PyQt6 import QtCore, QtGui, QtNetwork, QtWidgets
        from PyQt6.QtGui import QAction, QShortcut

        QT6 = True
    except ImportError:
        if _FORCED == "pyqt6":
            raise
        QT6 = False
else:
    QT6 = False

if not QT6:
    from PyQt5 import QtCore, QtGui, QtNetwork, QtWidgets
    from PyQt5.QtWidgets import QAction, QShortcut

BINDING = "PyQt6" if QT6 else "PyQt5"

Qt = QtCore.Qt
QObject = QtCore.QObject
QTimer = QtCore.QTimer
QByteArray = QtCore.QByteArray
QUrl = QtCore.QUrl
QProcess = QtCore.QProcess
QStandardPaths = QtCore.QStandardPaths
QBuffer = QtCore.QBuffer
QIODevice = QtCore.QIODevice
QRect = QtCore.QRect
QPoint = QtCore.QPoint
QSize = QtCore.QSize
pyqtSignal = QtCore.pyqtSignal
QImage = QtGui.QImage
QPainter = QtGui.QPainter
QColor = QtGui.QColor
QPixmap = QtGui.QPixmap
QKeySequence = QtGui.QKeySequence
QNetworkAccessManager = QtNetwork.QNetworkAccessManager
QNetworkRequest = QtNetwork.QNetworkRequest
QNetworkReply = QtNetwork.QNetworkReply
QApplication = QtWidgets.QApplication

__all__ = [
    "BINDING",
    "QT6",
    "QAction",
    "QApplication",
    "QBuffer",
    "QByteArray",
    "QColor",
    "QIODevice",
    "QImage",
    "QKeySequence",
    "QNetworkAccessManager",
    "QNetworkReply",
    "QNetworkRequest",
    "QObject",
    "QPainter",
    "QPixmap",
    "QPoint",
    "QProcess",
    "QRect",
    "QShortcut",
    "QSize",
    "QStandardPaths",
    "QTimer",
    "QUrl",
    "Qt",
    "QtCore",
    "QtGui",
    "QtNetwork",
    "QtWidgets",
    "pyqtSignal",
]


def image_bytes(image: QImage) -> bytes:
    """A copy of a QImage's pixel buffer (rows padded to bytesPerLine, as Qt stores them)."""
    return image.constBits().asstring(image.sizeInBytes())
