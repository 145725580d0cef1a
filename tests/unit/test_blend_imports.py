"""The blend core stays engine-free: importing it loads no engine, no hooks, no torch."""
import subprocess
import sys

CODE = """
import sys
before = set(sys.modules)
import cp_engine.blend.keys, cp_engine.blend.rope, cp_engine.blend.store
import cp_engine.blend.selection, cp_engine.blend.spans
new = set(sys.modules) - before
bad = sorted(m for m in new if m.split('.')[0] in ('vllm', 'sglang', 'torch', 'transformers')
             or m.startswith(('cp_engine.hooks', 'cp_engine.kernels')))
print(','.join(bad))
"""


def test_blend_imports_no_engine_hooks_kernels_or_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", out.stdout
