"""vLLM adapter (v1 engine; the supported releases are declared once, in ``table.py``).

``table.py`` lists every change the plugin makes to a vLLM process (plain data);
``patch.patch()`` / ``patch.unpatch()`` hand it to ``hooks.installer``, which applies
each row when the vLLM module it patches is imported. Glue modules: ``chat_rewrite``
and ``completion_rewrite`` (API server prompt rewrite), ``queue`` (EngineCore waiting
queue), ``eviction`` (EngineCore prefix-cache evictions), ``hints`` (how vLLM carries
the request hints), ``receiver`` (API server end of the eviction channel); SGLang's
adapter uses the same file names for the same roles. ``dp_rank`` (vLLM only) picks the
engine rank of a block-marked request under data parallelism. Importing this package
does not import vLLM.
"""
