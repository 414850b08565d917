"""Pruning methods, registered by name (``surgeon.methods.base.METHODS``)."""

from .base import METHODS, Context, get_method, register
from . import admm  # noqa: F401
from . import magnitude  # noqa: F401
from . import sparsegpt  # noqa: F401
from . import wanda  # noqa: F401
from . import flap  # noqa: F401
from . import surgeon  # noqa: F401

__all__ = ["METHODS", "Context", "get_method", "register"]
