"""This package loaded twice in one process: torch.hub's private copy beside an installed release of it.

When the importable ``ssd`` is another release of this project, ``hubconf.py`` loads the checkout under a private
name and, before importing it, names the installed release's error classes in ``sys.modules["_ssd_hub_state"]
.error_twins`` (keys like ``"io.http.DownloadError"``). The copy's error classes then derive from those, so that
``except ssd.DownloadError`` (the installed one) catches the copy's errors too: ``except`` matches by inheritance
only, never by ``__subclasscheck__``. Models need nothing of the kind: every consumer recognises a detector by its
spec, not by ``isinstance`` (see :mod:`ssd.backends.base`).
"""
from __future__ import annotations

import sys

__all__ = ["error_bases"]

HUB_STATE = "_ssd_hub_state"  # hubconf.py's module that outlives one hub load


def _bridge(twin: type) -> type:
    """A subclass of ``twin`` whose ``__init__`` skips ``twin``'s own: our constructor chain (``super()``) runs
    through our classes and the builtin base as written, whatever the other release's constructors take."""

    def __init__(self, *args, **kwargs) -> None:
        super(twin, self).__init__(*args, **kwargs)

    return type(twin.__name__, (twin,), {"__init__": __init__, "__module__": twin.__module__})


def error_bases(key: str, *bases: type) -> tuple[type, ...]:
    """The bases of the error class ``key`` (its module below ``ssd`` and its name): ``bases``, with the installed
    release's class of that name first when this module is such a private copy and the hierarchies join."""
    twins = getattr(sys.modules.get(HUB_STATE), "error_twins", None) or {}
    twin = twins.get(key)
    if not isinstance(twin, type) or not issubclass(twin, BaseException):
        return bases
    joined = (_bridge(twin), *(b for b in bases if not issubclass(twin, b)))
    try:
        type("probe", joined, {})  # an inconsistent order or clashing layouts: the classes stay apart
    except TypeError:
        return bases
    return joined
