"""Pruning methods, registered by name (``surgeon.methods.base.METHODS``)."""

from .base import METHODS, Context, get_method, register

__all__ = ["METHODS", "Context", "get_method", "register"]
