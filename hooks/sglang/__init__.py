"""SGLang adapter: eviction capture via KV events, cache-aware waiting order, and the
OpenAI chat rewrite. Entry: ``cp_engine.hooks.sglang.patch:patch`` (called by
``hooks.bootstrap``). Importing this package imports no SGLang module."""
