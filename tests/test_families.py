"""The model-family registry (worker/families): how models are told apart, and what a family
refuses at submit."""

from __future__ import annotations

import json
import sys

import pytest

from worker.families import FAMILIES, UnknownFamily, family_of, model_families
from worker.modelfiles import safetensors_shapes


def test_the_registry_is_torch_free_for_the_producer():
    import subprocess

    code = ("import sys; import worker.families, producer.client; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('torch', 'diffusers'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_family_says_what_the_rest_of_the_code_asks(tmp_path):
    from renderfarm.schema import SCHEDULERS

    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.folder_classes and family.txt2img in family.folder_classes
        assert set(family.schedulers) <= set(SCHEDULERS) and family.default_scheduler in \
            family.schedulers
        width, height = family.default_size
        assert family.min_side <= min(width, height) <= max(width, height) <= family.max_side
        assert width % family.size_multiple == 0 == height % family.size_multiple
        assert family.bytes_per_pixel > 0 and family.latent_rgb_factors
        assert all(len(row) == 3 for row in family.latent_rgb_factors)


def test_a_folder_is_told_by_its_pipeline_class(models_dir, tmp_path):
    assert family_of(models_dir / "tiny").name == "sd15"
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnknownFamily, match="KandinskyPipeline"):
        family_of(other)
    assert model_families(models_dir)["tiny"] == "sd15"


def test_safetensors_shapes_reads_the_header_without_torch(models_dir, tmp_path):
    from safetensors import safe_open

    path = models_dir / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert safetensors_shapes(path) == expected
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        safetensors_shapes(bad)
    assert family_of(bad) is None  # listed as a model, but of no family the producer can tell


def test_models_command_and_api_show_each_models_family(farm_settings, models_dir):
    from click.testing import CliRunner

    from renderfarm.cli import main

    env = {"RENDERFARM_REDIS_URL": farm_settings.redis_url,
           "RENDERFARM_MODELS_DIR": str(models_dir)}
    result = CliRunner().invoke(main, ["models"], env=env)
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[:2] for line in result.output.splitlines()
            if line.startswith("tiny\t")] == [["tiny", "sd15"]]
