"""The shapes model as the package ships it: ``renderfarm make-model shapes`` copies the shipped
weights, a package without them says where they are missing, and the demo then runs on tiny."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from renderfarm.demo import demo_model  # noqa: E402
from renderfarm.settings import Settings  # noqa: E402
from worker import modelgen  # noqa: E402


def test_without_shipped_weights_make_model_names_the_missing_folder_and_the_demo_uses_tiny(
        tmp_path, monkeypatch):
    missing = tmp_path / "package" / "data" / "shapes"
    monkeypatch.setattr(modelgen, "SHAPES_DIR", missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        modelgen.make_model("shapes", tmp_path / "models" / "shapes")
    assert not (tmp_path / "models" / "shapes").exists()
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    assert demo_model(settings) == "tiny"
    # A shapes model already in the models folder is used as it is.
    modelgen.make_model("tiny", tmp_path / "models" / "shapes")
    assert demo_model(settings) == "shapes"


def test_cli_make_model_shapes_without_shipped_weights_fails_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from renderfarm.cli import main

    monkeypatch.setattr(modelgen, "SHAPES_DIR", tmp_path / "nowhere")
    result = CliRunner().invoke(main, ["make-model", "shapes", str(tmp_path / "m")])
    assert result.exit_code != 0
    assert "the shapes model's weights are missing from" in result.output
    assert "Traceback" not in result.output
