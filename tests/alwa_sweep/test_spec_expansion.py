"""The redesign keeps every shipped spec's trials: the same keys and configs.

``tests/golden/specs_v1/`` are the specs as they were before the typed config, and
``spec_expansion_v1.json`` their expansion by the old dict-based loader. The typed
loader must give the same trials (keys) in the same order, and every value the
old config held must be the same in the new one (which also records every default).
Names may read differently (shorter labels of named grid values), but each is at most
250 characters (a PostgreSQL-backed MLflow server's run-name column) and unique in its spec.
"""

import json
from pathlib import Path

import pytest

from alwa_sweep.spec import load_spec
from trainers.config import flatten

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
EXPANSION = json.loads((GOLDEN / "spec_expansion_v1.json").read_text())


@pytest.mark.parametrize("spec_file", sorted(EXPANSION))
def test_typed_loader_expands_every_shipped_spec_as_before(spec_file, monkeypatch):
    monkeypatch.chdir(GOLDEN.parent.parent)  # the golden paths were made absolute from the repo root
    spec = load_spec(GOLDEN / "specs_v1" / spec_file, check_paths=False)
    before = EXPANSION[spec_file]
    assert [t.key for t in spec.trials] == [t["key"] for t in before]
    names = [t.name for t in spec.trials]
    assert max(map(len, names)) <= 250 and len(set(names)) == len(names)
    cwd = str(Path.cwd())
    for trial, old in zip(spec.trials, before):
        new = flatten(json.loads(json.dumps(trial.config.dump()).replace(cwd, "<cwd>")))
        old_flat = flatten(old["config"])
        changed = {k: (v, new.get(k, "<absent>")) for k, v in old_flat.items() if new.get(k, "<absent>") != v}
        assert not changed, f"{spec_file} {trial.name}: {changed}"


SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml")
                 if p.name != "released.yaml")  # the authors' settings, not a spec


@pytest.mark.parametrize("spec_file", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_trial_name_fits_a_postgresql_run_name_and_is_unique(spec_file):
    spec = load_spec(spec_file, check_paths=False)
    names = [t.name for t in spec.trials]
    too_long = [n for n in names if len(n) > 250]
    assert not too_long, too_long
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
    assert all(n and "/" not in n for n in names)  # no dataset path leaks into a name


def test_an_overlong_name_is_cut_and_keeps_its_key():
    from alwa_sweep.spec import trial_key, trial_name
    combo = {"setting": {f"model.field_{i}": "v" * 20 for i in range(20)}}
    name = trial_name(combo)
    assert len(name) == 250 and name.endswith("~" + trial_key(combo))
    other = {"setting": {**combo["setting"], "model.field_19": "w" * 20}}
    assert trial_name(other) != name and name.startswith("field_0=" + "v" * 20)
