"""The errors dissect raises for mistakes a user can fix, so callers (the CLI, the dashboard, scripts) catch exactly
those and let real bugs through.

Every class subclasses :class:`DissectError`, itself a ``ValueError`` (code that caught ``ValueError`` keeps
working). Messages name the problem and the fix in one or two sentences.
"""

from __future__ import annotations

__all__ = ["DissectError", "RequestError", "NonFiniteError", "EditFileError", "ModelError", "LayerError"]


class DissectError(ValueError):
    """A problem with what the user gave dissect (a request, a file, a model, a layer); nothing was changed."""


class RequestError(DissectError):
    """An edit request that cannot be served as given: empty or degenerate masks or contexts, a bad rank or
    strength, a paste off the image."""


class NonFiniteError(DissectError):
    """NaN or Inf in inputs, weights, keys, values or statistics, found before any solver runs."""


class EditFileError(DissectError):
    """An edit file that is missing, truncated, corrupted (checksum), not an edit file, or made for another
    model or layer."""


class ModelError(DissectError):
    """A model or entry point that cannot be loaded or run: an entry point that raises, a sampler that returns
    the wrong thing, a snapshot with the wrong architecture."""


class LayerError(DissectError, TypeError):
    """A layer that cannot be viewed or edited as asked: unsupported type, called more than once per forward,
    no spatial map where one is needed. Also a ``TypeError`` (code that caught that for unsupported layers
    keeps working)."""
