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
    """Finds nothing itself: wraps the real loader of ``transformers`` to register after it ran.
    A mere lookup (``importlib.util.find_spec("transformers")``, as availability checks do) leaves
    it in place; it leaves ``sys.meta_path`` once transformers has really been imported."""

    _looking = False

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET or self._looking:
            return None
        self._looking = True  # the lookup below goes through sys.meta_path again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_module
        return spec
