"""Build a tiny random-weight Llama model with a real trained tokenizer, offline.

    python -m cp_engine.devtools.tiny_model OUT_DIR [--force] [--shape prefill]

Contract: OUT_DIR gets a HuggingFace folder (``config.json``, safetensors weights,
``tokenizer.json`` + ``tokenizer_config.json`` with a ChatML-style chat template) that
vLLM and SGLang load with ``--model OUT_DIR``. Deterministic (fixed seeds, fixed
training text: the Python standard library's own sources), no network, ~13 MB.
A folder that already holds a complete model is left alone (``--force`` rebuilds).
Weights are random: cache hits and prompt-token counts do not depend on them.
Shapes (``SHAPES``): ``tiny`` (the default; tests and demos) and ``prefill``, for
prefill wall-time benchmarks: in ``tiny`` attention to earlier positions is over half
of a token's prefill FLOPs at the engine benchmark's prompt lengths (~3k tokens), so a
cached prefix saves less time than tokens; ``prefill`` splits the work between
attention and the linear layers as Qwen2.5-0.5B does there (``benchmarks.engine.token_sim
--dims`` predicts the same off/arm work ratios within 1%), at about the tiny model's
cost per token. Both shapes share the tokenizer, so prompts tokenize identically.
Needs ``transformers``, ``tokenizers`` and ``torch`` (present wherever vLLM is).
"""
from __future__ import annotations

import argparse
import glob
import os
import sysconfig
import tempfile

VOCAB_SIZE = 8192
# Decoder shapes by name (LlamaConfig fields).
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "prefill": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=64),
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DONE = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _training_files(limit_bytes: int = 6_000_000) -> list[str]:
    """Standard-library sources, sorted, up to ``limit_bytes`` (always present offline)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        size = os.path.getsize(path)
        if total + size > limit_bytes:
            break
        files.append(path)
        total += size
    return files


def build_tokenizer(out_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(_training_files(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: str, vocab_size: int, eos_id: int, bos_id: int, shape: str = "tiny") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, **SHAPES[shape], max_position_embeddings=8192,
                      rope_theta=10000.0, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=bos_id,
                      tie_word_embeddings=True, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)


def is_built(out_dir: str) -> bool:
    return all(os.path.exists(os.path.join(out_dir, f)) for f in _DONE) and bool(
        glob.glob(os.path.join(out_dir, "*.safetensors")))


def built_shape(out_dir: str) -> str | None:
    """Name of the shape whose fields the folder's config.json has, else None."""
    import json

    try:
        cfg = json.loads(open(os.path.join(out_dir, "config.json")).read())
    except (OSError, ValueError):
        return None
    for name, fields in SHAPES.items():
        if all(cfg.get(k) == v for k, v in fields.items()):
            return name
    return None


def build(out_dir: str, force: bool = False, shape: str = "tiny") -> str:
    """Build (or reuse) the model of ``shape`` in ``out_dir``; returns the folder path.

    A folder holding a complete model is left alone, except one of another shape of
    ours: that is an error rather than a silent mismatch (``force`` rebuilds)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    out_dir = os.path.abspath(out_dir)
    if is_built(out_dir) and not force:
        held = built_shape(out_dir)
        if held not in (None, shape):
            raise ValueError(f"{out_dir} holds the {held!r} model, not {shape!r} (use force to rebuild)")
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # Build beside the target and rename: concurrent test workers never see half a model.
    tmp = tempfile.mkdtemp(prefix=".tiny-model-", dir=parent)
    fast = build_tokenizer(tmp)
    build_model(tmp, len(fast), fast.convert_tokens_to_ids("<|im_end|>"), fast.convert_tokens_to_ids("<|endoftext|>"),
                shape)
    if is_built(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race; its model is equivalent
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a tiny offline Llama model for tests and demos.")
    ap.add_argument("out_dir")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    args = ap.parse_args(argv)
    print(build(args.out_dir, force=args.force, shape=args.shape))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
