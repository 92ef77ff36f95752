"""``hydra.utils.instantiate`` that lets the package's own input errors through unwrapped.

Hydra wraps every exception raised by a ``_target_`` in ``InstantiationException``; for errors that already say
what is wrong and how to fix it (bad data root, missing weights, invalid loss option) the wrapper only adds noise.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def build(node: Any, **kwargs: Any) -> Any:
    """Instantiate ``node``; a ``RuntimeError`` / ``ValueError`` raised by the target itself is re-raised as is."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (RuntimeError, ValueError)):
            raise cause from None
        raise
