"""``import performer`` registers the transformers classes of performer.hf, never importing transformers.

If transformers is already imported, ``performer.hf`` is imported (and registers) at once;
otherwise a one-shot import hook does it right after the program's own first ``import
transformers``. So ``AutoModelForSeq2SeqLM.from_pretrained(export)`` works once performer is
imported, in either order, while the core package and the trainer never import transformers. A
registration that fails (transformers too old, the hf extra half-installed) is a warning, never a
failed ``import transformers``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_TARGET = "transformers"


def install() -> None:
    """Register now, or when transformers is first imported."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _register() -> None:
    try:
        import performer.hf  # noqa: F401  (registers on import)
    except Exception as error:  # never break the user's import of transformers
        warnings.warn(f"performer: transformers classes not registered ({error})", stacklevel=3)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``transformers`` to register after it ran."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec
