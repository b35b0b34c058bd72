"""Every trial of the paper specs against the released settings (search_spaces/released.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alwa_sweep.spec import load_spec
from trainers.config import flatten

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
RELEASED = yaml.safe_load((SPACES / "released.yaml").read_text())


def _matches(match: dict, flat: dict) -> bool:
    """Every key equal; a list in ``match`` means any of its values."""
    for key, wanted in match.items():
        value = flat.get(key)
        if isinstance(wanted, list) and not isinstance(value, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def _expected_settings(table: str, flat: dict) -> dict:
    entry = RELEASED["tables"][table]
    setups = [name for name in entry["setups"] if _matches(RELEASED["setups"][name]["match"], flat)]
    assert len(setups) == 1, f"{table}: trial matches setups {setups}"
    expected = dict(RELEASED["setups"][setups[0]]["settings"])
    for rule in RELEASED.get("per_trial", []):
        if _matches(rule["match"], flat):
            expected.update(rule["settings"])
    expected.update(entry.get("overrides", {}))
    return {key: spec["value"] for key, spec in expected.items() if spec is not None}


def test_released_file_is_well_formed():
    sources = RELEASED["sources"]
    for name, setup in RELEASED["setups"].items():
        for key, spec in setup["settings"].items():
            if spec is not None:
                assert spec["source"] in sources, (name, key)
        for item in setup["not_configurable"]:
            assert item["source"] in sources and item["ours"] and "value" in item, (name, item)
    for rule in RELEASED["per_trial"]:
        assert all(s is None or s["source"] in sources for s in rule["settings"].values())
    assert set(RELEASED["tables"]) == {p.name for p in SPACES.glob("table*.yaml")}


@pytest.mark.parametrize("table", sorted(RELEASED["tables"]))
def test_every_trial_uses_the_released_settings(table):
    spec = load_spec(SPACES / table, check_paths=False)
    assert spec.trials
    for trial in spec.trials:
        flat = flatten(trial.config.dump())
        flat.update({f"resources.{k}": v for k, v in spec.resources.model_dump().items()})
        expected = _expected_settings(table, flat)
        wrong = {key: (flat.get(key, "<missing>"), value) for key, value in expected.items()
                 if flat.get(key, "<missing>") != value}
        assert not wrong, f"{table} trial {trial.name}: (ours, released) {wrong}"


def test_voc_passes_over_the_data_are_36():
    """12 epochs of RepeatDataset(times=3): 36 passes over VOC2012 trainval."""
    for table in ("table2_voc_alwa.yaml", "table6_ablation.yaml"):
        for trial in load_spec(SPACES / table, check_paths=False).trials:
            config = trial.config
            assert config.schedule.epochs * config.dataset.repeat == 36
