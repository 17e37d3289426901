"""KritaDocument: the only code that touches Krita's Document/Node/Selection objects.

It reads the pixels an edit needs (only the needed region), and inserts results as a new
group of new paint layers. Pixels are written into a node before it is inserted, because
`setPixelData` is not undoable but inserting a node is: one undo removes the whole group.
The source layer is never written to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import image as px
from . import provenance
from .image import Bounds, context_bounds, mask_coverage
from .qt import QByteArray

SUPPORTED = ("RGBA", "U8")


class UnsupportedDocument(Exception):
    """The document or layer cannot be edited as is; the message says what to do."""


@dataclass
class SourceRegion:
    """The pixels sent to the engine and where the results go back.

    `plan_source` fills in where (bounds, source); the pixels are read afterwards, a strip
    at a time (`read_rows`), into `bgra` and `selection`.
    """

    bounds: Bounds  # region in document pixels
    bgra: QByteArray | None  # bounds.width * bounds.height * 4 bytes, Krita's B,G,R,A order
    selection: QByteArray | None  # 1 byte per pixel over `bounds` (255 = selected), None = all
    source_kind: str  # "layer" or "canvas"
    source_name: str
    source_id: str | None  # unique id of the source layer (None for the canvas)
    node: Any = None  # the source node (None for the canvas)
    has_selection: bool = False  # a selection's pixels are read with the image


def check_color(model: str, depth: str, what: str) -> None:
    if (model, depth) != SUPPORTED:
        depth_words = {"U16": "16-bit integer", "F16": "16-bit float", "F32": "32-bit float"}.get(depth, depth)
        raise UnsupportedDocument(
            f"{what} is {model} {depth_words}; Instruct Edit works on 8-bit RGBA. Convert it with "
            "Image ▸ Convert Image Color Space… (RGB/Alpha, 8-bit integer) — or work on an 8-bit copy.")


def _uuid(node: Any) -> str:
    return node.uniqueId().toString()


def _qbytes(data: Any) -> QByteArray:
    return data if isinstance(data, QByteArray) else QByteArray(bytes(data))


class KritaDocument:
    def __init__(self, document: Any) -> None:
        self.document = document

    @property
    def canvas(self) -> Bounds:
        return Bounds(0, 0, self.document.width(), self.document.height())

    def active_layer(self) -> Any | None:
        return self.document.activeNode()

    def selection_bounds(self) -> Bounds | None:
        selection = self.document.selection()
        if selection is None or selection.width() <= 0 or selection.height() <= 0:
            return None
        return Bounds(selection.x(), selection.y(), selection.width(), selection.height())

    # --- reading ------------------------------------------------------------------------

    def plan_source(self, kind: str) -> SourceRegion:
        """Where an edit reads from (checks the colour space); no pixels are read yet."""
        doc = self.document
        canvas = self.canvas
        if kind == "layer":
            node = doc.activeNode()
            if node is None:
                raise UnsupportedDocument("Select a layer to edit, or choose “Visible canvas” as the source.")
            if node.type() not in ("paintlayer", "grouplayer", "filelayer", "clonelayer",
                                   "vectorlayer", "filllayer"):
                raise UnsupportedDocument(
                    f"“{node.name()}” is a {node.type()}; select a paint or group layer, or edit the visible canvas.")
            check_color(node.colorModel(), node.colorDepth(), f"The layer “{node.name()}”")
            area = _bounds_of(node).intersected(canvas)
            if area.is_empty:
                raise UnsupportedDocument(f"The layer “{node.name()}” is empty; paint something first.")
            name, node_id = node.name(), _uuid(node)
        else:
            check_color(doc.colorModel(), doc.colorDepth(), "This document")
            area, name, node_id, node = canvas, "Visible canvas", None, None
        sel_bounds = self.selection_bounds()
        if sel_bounds is not None:
            try:
                area = context_bounds(sel_bounds, canvas)
            except ValueError as err:
                raise UnsupportedDocument("The selection lies outside the canvas; deselect "
                                          "(Ctrl+Shift+A) or select inside the image.") from err
        return SourceRegion(area, None, None, kind, name, node_id, node, sel_bounds is not None)

    def read_rows(self, region: SourceRegion, top: int, rows: int) -> tuple[QByteArray, QByteArray | None]:
        """Rows [top, top + rows) of the region: (BGRA bytes, selection bytes or None)."""
        x, y, w, _ = region.bounds
        area = (x, y + top, w, rows)
        if region.node is not None:
            data = _qbytes(region.node.projectionPixelData(*area))
        else:
            data = _qbytes(self.document.pixelData(*area))
        expected = w * rows * 4
        if data.size() != expected:
            raise UnsupportedDocument(
                f"Krita returned {data.size()} bytes for a {w}×{rows} strip "
                f"(expected {expected}); is the layer 8-bit RGBA?")
        mask = None
        if region.has_selection:
            selection = self.document.selection()
            if selection is None:
                raise UnsupportedDocument("The selection changed while the image was read; try again.")
            mask = _qbytes(selection.pixelData(*area))
        return data, mask

    @staticmethod
    def settle_selection(region: SourceRegion) -> None:
        """After reading: drop a selection that selects everything, refuse an empty one."""
        if region.selection is None:
            return
        coverage = mask_coverage(region.selection)
        if coverage == "full":
            region.selection = None
        elif coverage == "empty":
            raise UnsupportedDocument("The selection is empty; select an area or deselect (Ctrl+Shift+A).")

    def read_source(self, kind: str) -> SourceRegion:
        """plan_source + every pixel at once (tests, benchmarks; the plugin reads in strips)."""
        region = self.plan_source(kind)
        region.bgra, region.selection = self.read_rows(region, 0, region.bounds.height)
        self.settle_selection(region)
        return region

    # --- writing ------------------------------------------------------------------------

    def new_layer(self, name: str) -> Any:
        """A paint layer that is not in the document yet (writing it needs no undo step)."""
        return self.document.createNode(name, "paintlayer")

    @staticmethod
    def write_rows(node: Any, region: SourceRegion, top: int, rows: int, data: QByteArray) -> None:
        x, y, w, _ = region.bounds
        node.setPixelData(data, x, y + top, w, rows)

    def insert_layers(self, region: SourceRegion, group_name: str,
                      layers: list[tuple[Any, dict[str, Any]]]) -> Any:
        """Add a group holding the already written `layers` (node, provenance); first visible.

        The group goes right above the source layer (or on top for the canvas): inserting it
        is the only undoable step. Returns the group node. The pixels must be written before:
        `setPixelData` on a node already in the image marks nothing dirty in Krita 5.1, so
        writing after insertion would stay invisible until a synchronous full refresh.
        """
        doc = self.document
        create_group = getattr(doc, "createGroupLayer", None)  # a GroupLayer (pass-through API)
        group = create_group(group_name) if create_group else doc.createNode(group_name, "grouplayer")
        # How the group shows up without doc.refreshProjection() (a synchronous recomposite of
        # the whole image: 50–80 ms at 4096² on 2 busy cores, plus a second full canvas redraw;
        # checked in Krita 5.1.5). `addChildNode` already runs the insertion as a stroke that
        # marks the whole image dirty and waits for the recomposite, but that does not
        # composite the group's children into the group: a group with ONE plain paint layer
        # shows it anyway (Krita uses the child's pixels as the group's), a group with several
        # (hidden variants) stays invisible. A pass-through group is composited child by child
        # into the layers below, so it shows at once; with one visible normal layer at full
        # opacity it gives exactly the same picture as an isolated group.
        refresh = False
        if len(layers) > 1:
            if hasattr(group, "setPassThroughMode"):
                group.setPassThroughMode(True)
            else:
                refresh = True
        records = self.provenance_records()
        above = None
        # Krita stacks a child above `above` (None = at the bottom): adding the variants
        # last-to-first leaves variant 0 on top, where it is visible.
        for index in reversed(range(len(layers))):
            layer, record = layers[index]
            layer.setVisible(index == 0)
            group.addChildNode(layer, above)
            above = layer
            records[_uuid(layer)] = record
        parent, above_node = self._insertion_point(region)
        parent.addChildNode(group, above_node)
        doc.setAnnotation(provenance.ANNOTATION_TYPE, provenance.ANNOTATION_DESCRIPTION,
                          QByteArray(provenance.encode_records(records)))
        if refresh:
            doc.refreshProjection()
        doc.setActiveNode(group.childNodes()[-1] if group.childNodes() else group)
        return group

    def insert_results(self, region: SourceRegion, group_name: str,
                       layers: list[tuple[str, Any, dict[str, Any]]]) -> Any:
        """Add a group with one paint layer per (name, bgra, provenance); first one visible."""
        x, y, w, h = region.bounds
        nodes = []
        for name, data, record in layers:
            layer = self.new_layer(name)
            layer.setPixelData(_qbytes(data), x, y, w, h)
            nodes.append((layer, record))
        return self.insert_layers(region, group_name, nodes)

    def _insertion_point(self, region: SourceRegion) -> tuple[Any, Any]:
        root = self.document.rootNode()
        if region.source_id is not None:
            source = self.find_node(region.source_id)
            if source is not None and source.parentNode() is not None:
                return source.parentNode(), source
        # On top of the layers (the global selection is a mask node among the children).
        layers = [n for n in root.childNodes() if not n.type().endswith("mask")]
        return root, (layers[-1] if layers else None)

    def find_node(self, node_id: str) -> Any | None:
        def walk(node: Any) -> Any | None:
            for child in node.childNodes():
                if _uuid(child) == node_id:
                    return child
                found = walk(child)
                if found is not None:
                    return found
            return None

        return walk(self.document.rootNode())

    # --- provenance -----------------------------------------------------------------------

    def provenance_records(self) -> dict[str, dict[str, Any]]:
        return provenance.decode_records(self.document.annotation(provenance.ANNOTATION_TYPE))

    def provenance_of(self, node: Any | None) -> dict[str, Any] | None:
        if node is None:
            return None
        return self.provenance_records().get(_uuid(node))


    # --- training pairs --------------------------------------------------------------------

    def training_pair(self, node: Any) -> tuple[str, bytes, bytes, int, int]:
        """(instruction, before BGRA, after BGRA, width, height) for a result layer.

        Before = the source as it is now over the edited region; after = the result layer
        composited over it (result layers only cover the selection).
        """
        record = self.provenance_of(node)
        if record is None:
            raise UnsupportedDocument(
                "Select a result layer made by Instruct Edit (inside a result group) to save it as a training pair.")
        x, y, w, h = (int(v) for v in record["bounds"])
        area = Bounds(x, y, w, h)
        source = self.find_node(record["source_id"]) if record.get("source_id") else None
        if source is not None:
            before = bytes(source.projectionPixelData(*area))
        else:
            # The canvas source: read the canvas without this edit's group.
            group = node.parentNode()
            was_visible = group.visible()
            group.setVisible(False)
            self.document.refreshProjection()
            before = bytes(self.document.pixelData(*area))
            group.setVisible(was_visible)
            self.document.refreshProjection()
        result = bytes(node.pixelData(*area))
        after = composite_over(before, result, w, h)
        return str(record.get("instruction", "")), before, after, w, h


    # --- pairs from the painter's own layers (the Train tab) --------------------------------

    def paint_layers(self) -> list[tuple[str, str]]:
        """(unique id, name) of every paint layer, top of the stack first (as Krita lists them).

        Layers inside groups are included, after their group's position.
        """
        found: list[tuple[str, str]] = []

        def walk(node: Any) -> None:
            for child in reversed(node.childNodes()):  # childNodes() is bottom first
                if child.type() == "paintlayer":
                    found.append((_uuid(child), child.name()))
                elif child.type() == "grouplayer":
                    walk(child)

        walk(self.document.rootNode())
        return found

    def default_pair_layers(self) -> tuple[str | None, str | None]:
        """(before, after) ids to offer: the layer below the current one and the current one
        (the painter's flat/sketch under their rendered/inked version); with nothing below,
        the current one and the layer above it."""
        layers = [node_id for node_id, _ in self.paint_layers()]
        if not layers:
            return None, None
        active = self.document.activeNode()
        current = _uuid(active) if active is not None else None
        index = layers.index(current) if current in layers else 0
        if index + 1 < len(layers):
            return layers[index + 1], layers[index]
        if index > 0:
            return layers[index], layers[index - 1]
        return layers[index], None

    def read_layer_pair(self, before_id: str, after_id: str) -> tuple[bytes, bytes, Bounds]:
        """Both layers' BGRA bytes over the same region, at full resolution (never scaled).

        The region is the selection's bounding box when there is a selection, else the
        layers' painted bounds — which must then be the same for both. Refuses (with what to
        do) layers that are missing, the same layer twice, not 8-bit RGBA, empty, or of
        different bounds.
        """
        if before_id == after_id:
            raise UnsupportedDocument("Choose two different layers: the “before” and the “after” are the same.")
        nodes = []
        for role, node_id in (("before", before_id), ("after", after_id)):
            node = self.find_node(node_id) if node_id else None
            if node is None:
                raise UnsupportedDocument(f"The {role} layer is gone; choose it again in the list.")
            check_color(node.colorModel(), node.colorDepth(), f"The {role} layer “{node.name()}”")
            nodes.append(node)
        before, after = nodes
        canvas = self.canvas
        selected = self.selection_bounds()
        if selected is not None:
            area = selected.intersected(canvas)
            if area.is_empty:
                raise UnsupportedDocument("The selection lies outside the canvas; deselect "
                                          "(Ctrl+Shift+A) or select inside the image.")
        else:
            areas = [_bounds_of(node).intersected(canvas) for node in nodes]
            for node in nodes:
                if _bounds_of(node).intersected(canvas).is_empty:
                    raise UnsupportedDocument(f"The layer “{node.name()}” is empty; paint it first.")
            if areas[0] != areas[1]:
                raise UnsupportedDocument(
                    f"The layers “{before.name()}” ({_describe(areas[0])}) and “{after.name()}” "
                    f"({_describe(areas[1])}) cover different areas, so their pixels would not "
                    "line up. Select the area to use for both (Select ▸ Select All, Ctrl+A, for "
                    "the whole canvas) and add the pair again.")
            area = areas[0]
        data = []
        for node in nodes:
            pixels = bytes(node.projectionPixelData(*area))
            if len(pixels) != area.width * area.height * 4:
                raise UnsupportedDocument(
                    f"Krita returned {len(pixels)} bytes for “{node.name()}” over "
                    f"{area.width}×{area.height} pixels; is the layer 8-bit RGBA?")
            if not pixels[3::4].strip(b"\0"):  # every alpha is 0 (C speed, no Python loop)
                raise UnsupportedDocument(f"The layer “{node.name()}” is empty in the chosen area.")
            data.append(pixels)
        return data[0], data[1], area


def _describe(area: Bounds) -> str:
    return f"{area.width}×{area.height} at {area.x},{area.y}"


def composite_over(below: bytes, above: bytes, width: int, height: int) -> bytes:
    from .qt import QPainter

    base = px.image_from_bgra(below, width, height).convertToFormat(px.PREMULTIPLIED)
    painter = QPainter(base)
    painter.drawImage(0, 0, px.image_from_bgra(above, width, height))
    painter.end()
    return px.bgra_from_image(base)


def _bounds_of(node: Any) -> Bounds:
    rect = node.bounds()
    return Bounds(rect.x(), rect.y(), rect.width(), rect.height())
