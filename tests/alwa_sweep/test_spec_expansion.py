"""The redesign keeps every shipped spec's trials: the same keys, names and configs.

``tests/golden/specs_v1/`` are the specs as they were before the typed config, and
``spec_expansion_v1.json`` their expansion by the old dict-based loader. The typed
loader must give the same trials (key, name) in the same order, and every value the
old config held must be the same in the new one (which also records every default).
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
    assert [(t.key, t.name) for t in spec.trials] == [(t["key"], t["name"]) for t in before]
    cwd = str(Path.cwd())
    for trial, old in zip(spec.trials, before):
        new = flatten(json.loads(json.dumps(trial.config.dump()).replace(cwd, "<cwd>")))
        old_flat = flatten(old["config"])
        changed = {k: (v, new.get(k, "<absent>")) for k, v in old_flat.items() if new.get(k, "<absent>") != v}
        assert not changed, f"{spec_file} {trial.name}: {changed}"
