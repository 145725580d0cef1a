"""The built-in random-weight models: named shapes, one shared tokenizer, no silent mix-up."""
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from cp_engine.devtools import tiny_model  # noqa: E402
from cp_engine.devtools.vllm_server import tiny_model_dir  # noqa: E402


def test_prefill_shape_gets_its_fields_and_the_tiny_models_tokenizer(tmp_path):
    out = tiny_model.build(str(tmp_path / "prefill"), shape="prefill")
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert {k: cfg[k] for k in tiny_model.SHAPES["prefill"]} == tiny_model.SHAPES["prefill"]
    assert tiny_model.built_shape(out) == "prefill"
    assert tiny_model.built_shape(tiny_model_dir()) == "tiny"
    # Same tokenizer: prompts tokenize identically, so token counts compare across shapes.
    assert (Path(out) / "tokenizer.json").read_bytes() == (Path(tiny_model_dir()) / "tokenizer.json").read_bytes()
    assert tiny_model.build(out, shape="prefill") == out  # reused, not rebuilt
    with pytest.raises(ValueError, match="'prefill' model, not 'tiny'"):
        tiny_model.build(out)


def test_a_foreign_model_folder_is_left_alone(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    config = {"model_type": "qwen2", "hidden_size": 896}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    assert tiny_model.built_shape(str(folder)) is None
    assert tiny_model.build(str(folder)) == str(folder)
    assert json.loads((folder / "config.json").read_text()) == config


def test_unknown_shape_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        tiny_model.build(str(tmp_path / "x"), shape="huge")
    assert not (tmp_path / "x").exists()
