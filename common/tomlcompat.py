"""``tomllib``, the one place fedcare gets it: the standard library's TOML reader on
Python 3.11+, the ``tomli`` package it was taken from on 3.10.

>>> tomllib.loads('a = 1')
{'a': 1}
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["tomllib"]
