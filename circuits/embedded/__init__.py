"""Embedded default: a procedural shapes dataset and small timm ViTs trained on it.

Public API: :class:`SyntheticShapes`, ``CLASS_NAMES``, ``N_CLASSES``, ``MEAN``, ``STD``,
:func:`collate`, :func:`normalize`, :func:`load_embedded_timm`, :func:`embedded_info`,
:func:`train_embedded`, ``EMBEDDED_NAMES``.

The model functions live in :mod:`circuits.embedded.train` and are imported lazily so that
``python -m circuits.embedded.train`` runs cleanly.
"""
from .synthetic import CLASS_NAMES, MEAN, N_CLASSES, STD, SyntheticShapes, collate, normalize

EMBEDDED_NAMES: tuple[str, ...] = ("default", "spurious")
_LAZY = ("load_embedded_timm", "embedded_info", "train_embedded")

__all__ = ["SyntheticShapes", "CLASS_NAMES", "N_CLASSES", "MEAN", "STD", "collate", "normalize",
           "load_embedded_timm", "embedded_info", "train_embedded", "EMBEDDED_NAMES"]


def __getattr__(name: str):
    """Lazily resolve the model functions from :mod:`circuits.embedded.train`."""
    if name in _LAZY:
        from . import train
        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
