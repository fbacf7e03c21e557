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


# -- the shipped weights ---------------------------------------------------------------------
def test_make_model_copies_the_shipped_weights(tmp_path):
    from worker.modelfiles import list_models

    shipped = sorted(p.relative_to(modelgen.SHAPES_DIR)
                     for p in modelgen.SHAPES_DIR.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in shipped), modelgen.SHAPES_DIR
    assert sum((modelgen.SHAPES_DIR / p).stat().st_size for p in shipped) <= 20e6
    modelgen.make_model("shapes", tmp_path / "shapes")
    assert "shapes" in list_models(tmp_path)
    copied = sorted(p.relative_to(tmp_path / "shapes")
                    for p in (tmp_path / "shapes").rglob("*") if p.is_file())
    assert copied == shipped
    # No half-copied folder is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]


def test_package_data_ships_every_file_of_the_model():
    """pyproject's package-data globs (relative to the renderfarm package) match each file."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["renderfarm"]
    package = root / "renderfarm"
    files = [p.relative_to(package).as_posix()
             for p in modelgen.SHAPES_DIR.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    # fnmatch's * crosses "/", setuptools' does not: compare part by part.
    for name in files:
        assert any(len(g.split("/")) == len(name.split("/")) and all(
            fnmatch.fnmatchcase(a, b) for a, b in zip(name.split("/"), g.split("/"), strict=True))
            for g in globs), name


def test_cli_make_model_shapes(tmp_path):
    from click.testing import CliRunner

    from renderfarm.cli import main

    result = CliRunner().invoke(main, ["make-model", "shapes", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "wrote shapes model to" in result.output
    config = (tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text()
    assert '"prediction_type": "v_prediction"' in config
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
