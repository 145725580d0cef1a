"""A package's public API loaded on first use (PEP 562).

``exports(package, table, namespace)`` returns the ``(__getattr__, __dir__)`` pair for a
package ``__init__``: ``table`` maps each public name to the submodule that defines it.
The submodule is imported when the name is first read and the value is cached in
``namespace``, so ``pkg.name`` and ``from pkg import name`` behave as with eager
imports, ``dir(pkg)`` lists every public name before it loads, and an unknown name
raises ``AttributeError``.
"""
# Imports nothing at module level: cp_engine's __init__ uses it at every interpreter start.


def exports(package: str, table: dict, namespace: dict):
    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(f"{package}.{module}"), name)
        namespace[name] = value  # later reads find it without calling this function
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
