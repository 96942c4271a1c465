"""Deprecated alias of ``kvwire.testing.fixtures``, where the test models and payloads moved.

Owns nothing: every name resolves to the one in ``kvwire.testing.fixtures`` (the same object), and importing
this module warns ``DeprecationWarning``. Test-only code is not part of the runtime package; import
``kvwire.testing.fixtures`` instead. Nothing in the repository imports this alias.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..testing import fixtures as _moved

warnings.warn("kvwire.codec.fixtures moved to kvwire.testing.fixtures: import it from there",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
