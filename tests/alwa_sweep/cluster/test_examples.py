"""The shipped cluster launcher config and Dockerfile are consistent with the package."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))  # raises on a bad field
    gpu = config["available_node_types"]["gpu_4x"]["resources"]
    assert gpu["GPU"] == 4 and config["available_node_types"]["head"]["resources"]["CPU"] == 0


def test_dockerfile_installs_every_package_of_the_project():
    text = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    for name in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"COPY --chown=ray {name} ", text), name
        assert (REPO / name).is_dir()
    assert "ray[default" in text and "FROM nvidia/cuda" in text
