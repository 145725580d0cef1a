"""SGLang adapter: eviction capture via KV events, cache-aware waiting order, and the
OpenAI chat rewrite. ``table.py`` lists every change it makes to an SGLang process
(plain data); ``patch.patch()`` (called by ``hooks.bootstrap``) hands it to
``hooks.installer``. Importing this package imports no SGLang module."""
