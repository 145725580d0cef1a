"""What the ``cp_engine_autoload.pth`` line runs in every Python process.

Contract: ``install()`` is cheap: the line loads only this module, its two parent
packages and ``cp_engine.lazy`` (no numpy, no wrapt, no engine), and ``install()`` puts
one small finder first on ``sys.meta_path``. It is idempotent, never raises, and does
nothing when ``CP_ENGINE_DISABLE`` is set. The finder answers nothing but the top-level
``vllm`` and ``sglang`` imports, and for those only wraps the loader, so the real work
(``bootstrap.activate``) runs only in processes that import vLLM or SGLang, right after
that module has executed. An engine imported before ``install()`` is handled at once,
so both orders work. Once every engine has been seen the finder removes itself.
"""
# No ``from __future__`` import here or in the parent packages: every module this file
# pulls in is paid by every interpreter start in the environment.
import _thread
import os
import sys

__all__ = ["PTH_NAME", "PTH_LINE", "install", "disabled"]

PTH_NAME = "cp_engine_autoload.pth"
# One line (site only executes .pth lines that start with "import"). The env check runs
# before anything of ours is imported; the exec'd try/except keeps a broken or
# half-removed install from printing tracebacks at every interpreter start.
PTH_LINE = (
    "import os; os.environ.get('CP_ENGINE_DISABLE', '').strip().lower() in ('1', 'true', 'yes', 'on') "
    "or exec(\"try:\\n import cp_engine.hooks.autoload as _cpa; _cpa.install()\\nexcept Exception:\\n pass\")"
)

ENGINES = ("vllm", "sglang")
_installed = False
_pending = set()  # engines whose import has not been seen yet


def disabled() -> bool:
    return os.environ.get("CP_ENGINE_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _on_engine_import(module) -> None:
    try:
        _pending.discard(module.__name__)
        if not _pending:
            _remove_watch()
        from . import bootstrap

        bootstrap.activate(module.__name__, source="pth")
    except Exception:
        pass  # bootstrap logs and counts its own failures; this guards its import


class _HookedLoader:
    """The engine's own loader, plus one call to the engine hook after ``exec_module``."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # resource readers, get_data, is_package, ...
        if name == "loader":  # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        # The module should name its real loader (importlib.resources, pkgutil read it).
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        self.loader.exec_module(module)
        _on_engine_import(module)


class _EngineImportWatch:
    """Meta-path finder that returns None for every name but a pending engine; for an
    engine it returns the spec the other finders give, with the loader hooked."""

    def __init__(self):
        self._busy = set()  # (name, thread) being looked up: other finders may recurse

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending:
            return None
        key = (fullname, _thread.get_ident())
        if key in self._busy:
            return None
        self._busy.add(key)
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None) if finder is not self else None
                spec = find(fullname, path, target) if find is not None else None
                if spec is None:
                    continue
                if spec.loader is not None and hasattr(spec.loader, "exec_module") \
                        and not isinstance(spec.loader, _HookedLoader):
                    spec.loader = _HookedLoader(spec.loader)
                return spec
            return None
        except Exception:
            return None  # the regular finders answer; the engine loads without our hook
        finally:
            self._busy.discard(key)


_watch = _EngineImportWatch()


def _remove_watch() -> None:
    try:
        sys.meta_path.remove(_watch)
    except ValueError:
        pass


def install() -> bool:
    """Watch for the engines' imports once; return whether the watch is in place."""
    global _installed
    if _installed:
        return True
    if disabled():
        return False
    try:
        _pending.update(name for name in ENGINES if name not in sys.modules)
        if _pending and _watch not in sys.meta_path:
            sys.meta_path.insert(0, _watch)
        _installed = True
        for name in ENGINES:
            module = sys.modules.get(name)
            if module is not None:
                _on_engine_import(module)
    except Exception:
        return False
    return True
