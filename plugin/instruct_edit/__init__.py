"""Instruct Edit for Krita: edit layers with instructions ("make it evening").

Inside Krita this registers the docker and the menu actions; outside Krita (tests, the
benchmark) importing the package does nothing else, so its modules can be used directly.
"""

try:
    import krita as _krita
except ImportError:  # not running inside Krita
    _krita = None

if _krita is not None and hasattr(_krita, "Krita") and _krita.Krita.instance() is not None:
    from .extension import InstructEditExtension
    from .ui.docker import DOCKER_ID, InstructEditDocker

    _app = _krita.Krita.instance()
    _app.addExtension(InstructEditExtension(_app))
    # Krita 6 (PyQt6) only has the scoped enum; Krita 5's sip module has both.
    _positions = getattr(_krita.DockWidgetFactoryBase, "DockPosition", _krita.DockWidgetFactoryBase)
    _app.addDockWidgetFactory(
        _krita.DockWidgetFactory(DOCKER_ID, _positions.DockRight, InstructEditDocker))
