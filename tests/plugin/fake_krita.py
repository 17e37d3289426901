"""A small in-memory stand-in for Krita's Python API (`krita` module), for tests.

It keeps real pixels (8-bit BGRA over the whole canvas, per layer), composites visible
layers like Krita does (normal blending), tracks undo steps for node insertions into the
document tree, and stores annotations. Only what the plugin uses is implemented; the
real-Krita test (test_krita_e2e.py) checks the same behaviour in Krita itself.
"""

from __future__ import annotations

import sys
import types
import uuid
from typing import Any

from instruct_edit.qt import QByteArray, QImage, QObject, QPainter, QRect, QtCore, QtWidgets

ARGB32 = QImage.Format.Format_ARGB32


class _Uuid:
    def __init__(self, value: str) -> None:
        self.value = value

    def toString(self) -> str:
        return "{" + self.value + "}"


class Node:
    def __init__(self, document: Document, name: str, kind: str) -> None:
        self.document = document
        self._name = name
        self._type = kind
        self._children: list[Node] = []
        self._parent: Node | None = None
        self._visible = True
        self._uuid = str(uuid.uuid4())
        self.color = ("RGBA", "U8")
        # Paint layers keep what was written as patches (x, y, w, h, bytes), newest last:
        # cheap like Krita's tiled devices, even on a 4096² canvas.
        self._patches: list[tuple[int, int, int, int, bytes]] | None = [] if kind == "paintlayer" else None
        self._painted: tuple[int, int, int, int] | None = None
        self.writes = 0  # setPixelData calls, to prove the source is never written
        self._pass_through = False

    # identity
    def name(self) -> str:
        return self._name

    def setName(self, name: str) -> None:
        self._name = name

    def type(self) -> str:
        return self._type

    def uniqueId(self) -> _Uuid:
        return _Uuid(self._uuid)

    def colorModel(self) -> str:
        return self.color[0]

    def colorDepth(self) -> str:
        return self.color[1]

    def visible(self) -> bool:
        return self._visible

    def setVisible(self, visible: bool) -> None:
        self._visible = bool(visible)

    # group layers (Krita: GroupLayer). Pass-through composites the children straight onto
    # the layers below; with normal blending at full opacity (all this fake does) the picture
    # is the same as an isolated group's, so only the flag is kept.
    def setPassThroughMode(self, value: bool) -> None:
        assert self._type == "grouplayer", "setPassThroughMode on a " + self._type
        self._pass_through = bool(value)

    def passThroughMode(self) -> bool:
        return self._pass_through

    # tree
    def childNodes(self) -> list[Node]:
        return list(self._children)  # bottom first, like Krita

    def parentNode(self) -> Node | None:
        return self._parent

    def addChildNode(self, child: Node, above: Node | None) -> bool:
        index = 0 if above is None else self._children.index(above) + 1
        self._children.insert(index, child)
        child._parent = self
        if self.document.is_attached(self):
            self.document.undo_stack.append(("add", child))
        return True

    def remove(self) -> bool:
        if self._parent is not None:
            self._parent._children.remove(self)
            self._parent = None
        return True

    # pixels
    def bounds(self) -> QRect:
        if self._type == "grouplayer":
            rect = QRect()
            for child in self._children:
                rect = rect.united(child.bounds())
            return rect
        if self._painted is None:
            return QRect()
        return QRect(*self._painted)

    def pixelData(self, x: int, y: int, w: int, h: int) -> QByteArray:
        if self._patches is None:
            return self.projectionPixelData(x, y, w, h)
        return QByteArray(_read(self._patches, x, y, w, h))

    def projectionPixelData(self, x: int, y: int, w: int, h: int) -> QByteArray:
        if self._type != "grouplayer":
            return self.pixelData(x, y, w, h)
        return QByteArray(_composite(self._children, x, y, w, h))

    def setPixelData(self, data: Any, x: int, y: int, w: int, h: int) -> bool:
        data = bytes(data)
        assert len(data) == w * h * 4, "setPixelData: wrong byte count"
        assert self._patches is not None, "setPixelData on a group"
        self.writes += 1
        canvas = QRect(0, 0, self.document.width(), self.document.height())
        self._patches.append((x, y, w, h, data))
        painted = QRect(x, y, w, h).intersected(canvas)
        rect = painted if self._painted is None else QRect(*self._painted).united(painted)
        self._painted = (rect.x(), rect.y(), rect.width(), rect.height())
        return True


def _read(patches: list[tuple[int, int, int, int, bytes]], x: int, y: int, w: int, h: int) -> bytes:
    """The region (x, y, w, h) of a layer: transparent, then each patch over it in order."""
    out = bytearray(w * h * 4)
    for px_, py, pw, ph, data in patches:
        x0, x1 = max(x, px_), min(x + w, px_ + pw)
        y0, y1 = max(y, py), min(y + h, py + ph)
        if x1 <= x0 or y1 <= y0:
            continue
        span = (x1 - x0) * 4
        for row in range(y0, y1):
            src = ((row - py) * pw + (x0 - px_)) * 4
            dst = ((row - y) * w + (x0 - x)) * 4
            out[dst : dst + span] = data[src : src + span]
    return bytes(out)


def _composite(nodes: list[Node], x: int, y: int, w: int, h: int) -> bytes:
    canvas = QImage(w, h, QImage.Format.Format_ARGB32_Premultiplied)
    canvas.fill(0)
    painter = QPainter(canvas)
    for node in nodes:  # bottom first
        if node.visible():
            data = bytes(node.projectionPixelData(x, y, w, h))
            painter.drawImage(0, 0, QImage(data, w, h, w * 4, ARGB32))
    painter.end()
    image = canvas.convertToFormat(ARGB32)
    return image.constBits().asstring(image.sizeInBytes())


class Selection:
    def __init__(self, width: int, height: int) -> None:
        self._w, self._h = width, height
        self.mask = bytearray(width * height)
        self._rect = QRect()

    def select_rect(self, x: int, y: int, w: int, h: int, value: int = 255) -> Selection:
        for row in range(y, y + h):
            self.mask[row * self._w + x : row * self._w + x + w] = bytes([value]) * w
        self._rect = self._rect.united(QRect(x, y, w, h))  # bounding box, like Krita's
        return self

    def set_mask(self, data: bytes, x: int, y: int, w: int, h: int) -> Selection:
        """The whole canvas's selection bytes at once (soft selections), with their bounding box."""
        assert len(data) == self._w * self._h
        self.mask[:] = data
        self._rect = QRect(x, y, w, h)
        return self

    def _box(self) -> tuple[int, int, int, int]:
        return self._rect.x(), self._rect.y(), self._rect.width(), self._rect.height()

    def x(self) -> int:
        return self._box()[0]

    def y(self) -> int:
        return self._box()[1]

    def width(self) -> int:
        return self._box()[2]

    def height(self) -> int:
        return self._box()[3]

    def pixelData(self, x: int, y: int, w: int, h: int) -> QByteArray:
        out = bytearray(w * h)
        for row in range(h):
            yy = y + row
            if 0 <= yy < self._h:
                x0, x1 = max(0, x), min(self._w, x + w)
                out[row * w + x0 - x : row * w + x1 - x] = self.mask[yy * self._w + x0 : yy * self._w + x1]
        return QByteArray(bytes(out))


class Document:
    def __init__(self, width: int, height: int, name: str = "test") -> None:
        self._w, self._h = width, height
        self._name = name
        self.color = ("RGBA", "U8")
        self._root = Node(self, "root", "grouplayer")
        self._active: Node | None = None
        self._selection: Selection | None = None
        self._annotations: dict[str, tuple[str, bytes]] = {}
        self.undo_stack: list[tuple[str, Node]] = []
        self.projection_refreshes = 0

    def is_attached(self, node: Node | None) -> bool:
        while node is not None:
            if node is self._root:
                return True
            node = node._parent
        return False

    def width(self) -> int:
        return self._w

    def height(self) -> int:
        return self._h

    def name(self) -> str:
        return self._name

    def colorModel(self) -> str:
        return self.color[0]

    def colorDepth(self) -> str:
        return self.color[1]

    def rootNode(self) -> Node:
        return self._root

    def createNode(self, name: str, kind: str) -> Node:
        return Node(self, name, kind)

    def createGroupLayer(self, name: str) -> Node:
        return Node(self, name, "grouplayer")

    def activeNode(self) -> Node | None:
        return self._active

    def setActiveNode(self, node: Node) -> None:
        self._active = node

    def selection(self) -> Selection | None:
        return self._selection

    def setSelection(self, selection: Selection | None) -> None:
        self._selection = selection

    def pixelData(self, x: int, y: int, w: int, h: int) -> QByteArray:
        return QByteArray(_composite(self._root.childNodes(), x, y, w, h))

    def refreshProjection(self) -> None:
        self.projection_refreshes += 1

    def annotation(self, kind: str) -> QByteArray:
        return QByteArray(self._annotations.get(kind, ("", b""))[1])

    def setAnnotation(self, kind: str, description: str, data: Any) -> None:
        self._annotations[kind] = (description, bytes(data))

    def undo(self) -> None:
        """Krita's Edit ▸ Undo for node insertions: removes the last inserted top-level node."""
        _, node = self.undo_stack.pop()
        node.remove()

    def add_paint_layer(self, name: str, fill: Any = None) -> Node:
        """Test helper: a paint layer on top, optionally filled by fill(x, y) -> (b, g, r, a)."""
        node = self.createNode(name, "paintlayer")
        if fill is not None:
            data = bytearray(self._w * self._h * 4)
            for yy in range(self._h):
                for xx in range(self._w):
                    data[(yy * self._w + xx) * 4 : (yy * self._w + xx) * 4 + 4] = bytes(fill(xx, yy))
            node.setPixelData(bytes(data), 0, 0, self._w, self._h)
            node.writes = 0
        children = self._root.childNodes()
        self._root.addChildNode(node, children[-1] if children else None)
        self.undo_stack.clear()
        self._active = node
        return node


class Krita:
    _instance: Krita | None = None

    def __init__(self) -> None:
        self.document: Document | None = None
        self.dock_factories: list[Any] = []
        self.extensions: list[Any] = []

    @classmethod
    def instance(cls) -> Krita:
        if cls._instance is None:
            cls._instance = Krita()
        return cls._instance

    def activeDocument(self) -> Document | None:
        return self.document

    def addDockWidgetFactory(self, factory: Any) -> None:
        self.dock_factories.append(factory)

    def addExtension(self, extension: Any) -> None:
        self.extensions.append(extension)


class DockWidget(QtWidgets.QDockWidget):
    def canvasChanged(self, canvas: Any) -> None:
        pass


class DockWidgetFactoryBase:
    class DockPosition:
        DockRight = 2


class DockWidgetFactory:
    def __init__(self, dock_id: str, position: int, cls: type) -> None:
        self.id, self.position, self.cls = dock_id, position, cls


class Extension(QObject):
    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent if isinstance(parent, QtCore.QObject) else None)


def install() -> types.ModuleType:
    """Register this module as `krita` (fresh Krita instance each time)."""
    Krita._instance = None
    module = sys.modules[__name__]
    sys.modules["krita"] = module
    return module
