"""Generated specs, configs and ``--set`` values against the real CLI, in process.

Each example is given to ``alwa_sweep.cli.main`` (``validate``, ``train``, ``run``) with a
fresh temporary runs folder, work folder and SQLite store. For ``train`` and ``run`` every
generated input holds at least one field that is invalid *by construction* (so nothing
would train), and the message must name that field. For every example: exit code 2 (or
0 for a ``validate`` input that happens to be valid), stderr one ``error:`` block without
"Traceback", and nothing created: no MLflow run (no store with a run), no sweep folder,
no work folder or lock file, Ray not initialised.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alwa_sweep.cli import main
from reliability_helpers import runs_in_store
from trainers.config import MAX_SEED

EXAMPLES = {"validate": 60, "train": 45, "run": 45}
_counts = {name: 0 for name in EXAMPLES}


def _settings(command: str):
    return settings(max_examples=EXAMPLES[command], deadline=4000, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ---- invalid values, each with the field the message must name --------------------------------

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
not_numbers = st.one_of(st.text(alphabet="abcxyzé✓ ", min_size=1, max_size=6), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), min_size=1, max_size=1),
                        st.booleans(), st.none())
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
huge_ints = st.integers(2**63, 2**200)


def ints_outside(low: int, high: int):
    return st.one_of(st.integers(max_value=low - 1, min_value=low - 2**40), st.integers(high + 1, high + 2**40),
                     huge_ints, non_finite, not_numbers, st.floats(0.5, 9.5).filter(lambda f: f != int(f)))


def positive_floats_invalid(high: float | None = None):
    bad = [st.floats(max_value=0.0, allow_nan=False, allow_infinity=False, min_value=-1e300), non_finite,
           not_numbers.filter(lambda v: not isinstance(v, bool) and v is not None)]
    if high is not None:
        bad.append(st.floats(min_value=high * 2, max_value=1e300))
    return st.one_of(*bad)


# (dotted field, strategy of invalid values, base-config overrides that make the field meaningful)
INVALID_FIELDS = [
    ("train.batch_size", ints_outside(1, 1024), {}),
    ("train.seed", ints_outside(0, MAX_SEED), {}),
    ("train.log_every", ints_outside(1, 1_000_000), {}),
    ("schedule.max_iters", ints_outside(1, 100_000_000), {}),
    ("schedule.warmup_iters", ints_outside(0, 100_000_000), {}),
    ("dataset.num_workers", ints_outside(0, 64), {}),
    ("dataset.flip", st.one_of(st.floats(1.01, 1e300), st.floats(-1e300, -0.01), non_finite), {}),
    ("optimizer.lr", positive_floats_invalid(), {}),
    ("weighting.interval", ints_outside(1, 1_000_000), {"weighting": {"method": "alwa"}}),
    ("weighting.lambda0", positive_floats_invalid(), {"weighting": {"method": "alwa"}}),
    ("model.detector", unicode_text.filter(lambda t: t not in {
        "faster_rcnn", "double_head_rcnn", "dynamic_rcnn", "libra_rcnn", "mask_rcnn", "retinanet",
        "cascade_rcnn", "fcos", "atss"}), {}),
    ("dataset.kind", unicode_text.filter(lambda t: t not in {"voc", "coco"}), {}),
    ("weighting.method", unicode_text.filter(lambda t: t not in {
        "alwa", "dtp", "dwa", "fixed", "guided", "none", "uncertainty"}), {}),
    ("dataset.scale", st.one_of(st.just([]), st.lists(st.integers(-2**40, 0), min_size=2, max_size=2),
                                st.lists(st.integers(64, 128), min_size=3, max_size=5),
                                st.tuples(non_finite, st.just(64)).map(list), not_numbers), {}),
]


@dataclass
class Broken:
    field: str          # the dotted field that is invalid
    value: object
    via_set: bool       # given with --set rather than in the file
    extra_overrides: dict


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _set_dotted(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


@st.composite
def broken_field(draw) -> Broken:
    field, values, extra = draw(st.sampled_from(INVALID_FIELDS))
    return Broken(field, draw(values), draw(st.booleans()), extra)


@st.composite
def unknown_key(draw) -> Broken:
    """A key no section has: at the top level or in a section, random unicode."""
    section = draw(st.sampled_from(["", "train.", "optimizer.", "schedule.", "dataset.", "model."]))
    key = draw(st.text(st.characters(whitelist_categories=("Ll", "Lu", "Lo", "Nd")), min_size=1, max_size=8)
               .filter(lambda k: k.lower() not in {"train", "model", "dataset", "schedule", "optimizer",
                                                    "weighting", "evaluation"} and not k.isdigit()))
    return Broken(section + "zz" + key, draw(st.integers(0, 9)), False, {})


@st.composite
def wrong_nesting(draw) -> Broken:
    """A section given as a scalar or a list instead of a mapping."""
    section = draw(st.sampled_from(["train", "optimizer", "schedule", "dataset", "model"]))
    return Broken(section, draw(st.one_of(st.integers(), unicode_text, st.lists(st.integers(), max_size=3))),
                  False, {})


invalid_inputs = st.one_of(broken_field(), broken_field(), unknown_key(), wrong_nesting())


def _yaml_value(value) -> str:
    """``value`` as the text of ``--set key=<text>``."""
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip().removesuffix(
        "\n...").removesuffix("...").strip()


# ---- the world of one example ----------------------------------------------------------------

class World:
    def __init__(self, voc: dict):
        self._tmp = tempfile.TemporaryDirectory(prefix="gen_cli_")
        self.tmp = Path(self._tmp.name)
        self.voc = voc
        self.runs = self.tmp / "runs"
        self.store = self.tmp / "store" / "mlflow.db"
        self.work = self.tmp / "work"

    def close(self):
        self._tmp.cleanup()

    def base(self) -> dict:
        return {"dataset": {"kind": "voc", "root": self.voc["root"], "train_sets": self.voc["train_sets"],
                            "test_sets": self.voc["test_sets"], "scale": [64, 64], "num_workers": 0},
                "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
                "schedule": {"unit": "iter", "max_iters": 4, "steps": [3], "warmup_iters": 1},
                "train": {"batch_size": 2, "log_every": 2, "eval_every": 0}}

    def config_with(self, broken: Broken) -> tuple[dict, list[str]]:
        config = _merge(self.base(), broken.extra_overrides)
        if broken.via_set:
            return config, ["--set", f"{broken.field}={_yaml_value(broken.value)}"]
        _set_dotted(config, broken.field, broken.value) if "." in broken.field else config.__setitem__(
            broken.field, broken.value)
        return config, []

    def write(self, name: str, data) -> str:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        return str(path)

    def created(self) -> list[str]:
        import ray

        found = []
        for db in (self.store, self.runs / "mlflow.db", self.tmp / "alwa_runs" / "mlflow.db"):
            if runs_in_store(db):
                found.append(f"{runs_in_store(db)} MLflow run(s) in {db}")
        if (self.runs / "sweeps").exists():
            found.append("a sweep folder")
        if self.work.exists():
            found.append(f"the work folder {self.work} ({sorted(p.name for p in self.work.iterdir())})")
        if list(self.tmp.rglob(".lock")):
            found.append("a lock file")
        if ray.is_initialized():
            found.append("a Ray session")
        return found


def _invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _check_error(code, out, err, *, names: tuple[str, ...] = ()) -> None:
    assert code == 2, f"exit code {code}; stdout {out[-400:]!r}; stderr {err[-400:]!r}"
    assert "Traceback" not in out + err
    text = err.strip()
    assert text.startswith("error: "), f"stderr: {text[:300]!r}"
    assert sum(line.startswith("error:") for line in text.splitlines()) == 1, f"more than one error block: {text!r}"
    assert "\n\n" not in text, f"not one block: {text!r}"
    if names:
        assert any(name in text for name in names), f"none of {names} named in {text!r}"


def _names(broken: Broken) -> tuple[str, ...]:
    leaf = broken.field.rsplit(".", 1)[-1]
    return (broken.field, repr(leaf), leaf)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for variable in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)  # a default ./alwa_runs would land here (and is checked below)


# ---- the properties ----------------------------------------------------------------------------

@_settings("train")
@given(broken=invalid_inputs)
def test_generated_invalid_configs_to_train_fail_naming_the_field(broken, synthetic_voc, capsys, tmp_path):
    world = World(synthetic_voc)
    try:
        config, extra = world.config_with(broken)
        argv = ["train", world.write("config.yaml", config), "--tracking-uri", f"sqlite:///{world.store}",
                "--workdir", str(world.work), *extra]
        code, out, err = _invoke(argv, capsys)
        _check_error(code, out, err, names=_names(broken))
        assert world.created() == []
        assert not (tmp_path / "alwa_runs").exists()
    finally:
        world.close()
    _counts["train"] += 1


spec_level_invalid = st.one_of(
    st.tuples(st.just("seeds"), st.one_of(st.lists(st.integers(-2**40, -1), min_size=1, max_size=3),
                                           st.lists(st.integers(MAX_SEED + 1, 2**70), min_size=1, max_size=3),
                                           st.just([]), st.lists(non_finite, min_size=1, max_size=2),
                                           unicode_text)),
    st.tuples(st.just("resources.cpus_per_worker"), st.one_of(non_finite, st.floats(-1e300, -1e-9),
                                                              st.floats(1025, 1e300), not_numbers)),
    st.tuples(st.just("resources.gpus_per_worker"), st.one_of(non_finite, st.floats(-1e300, -1e-9),
                                                              st.floats(65, 1e300))),
    st.tuples(st.just("resources.workers"), ints_outside(1, 1024)),
    st.tuples(st.just("max_concurrent"), ints_outside(1, 100_000).filter(lambda v: v is not None)),
    st.tuples(st.just("max_failures"), ints_outside(0, 100)),
    st.tuples(st.just("max_trials"), ints_outside(1, 1_000_000)),
)


@st.composite
def broken_spec(draw):
    """A spec with one invalid part: a field of a trial's config (in the base, the grid or --set),
    a spec-level field, or a grid of the wrong shape. Returns (spec dict, extra argv, names)."""
    kind = draw(st.sampled_from(["base", "grid", "spec", "grid_shape", "too_many"]))
    base = draw(st.just(None))
    if kind in ("base", "grid"):
        broken = draw(broken_field())
        return kind, broken, base
    if kind == "spec":
        field, value = draw(spec_level_invalid)
        return kind, Broken(field, value, draw(st.booleans()) and field != "seeds", {}), base
    if kind == "grid_shape":
        value = draw(st.one_of(st.just({}), st.just([]), unicode_text, st.integers(),
                               st.dictionaries(st.sampled_from(["weighting.method", "train.batch_size"]),
                                               st.one_of(st.just([]), unicode_text, st.integers(),
                                                         st.dictionaries(unicode_text, st.integers(), max_size=2)),
                                               min_size=1, max_size=2)))
        return kind, Broken("grid", value, False, {}), base
    # a grid whose product exceeds max_trials (default 1000): 1,600 to 1.7 million trials
    axes = draw(st.integers(2, 3))
    width = draw(st.integers(40, 120))
    return kind, Broken("grid", {"train.seed" if i == 0 else f"zz{i}.a": list(range(width)) for i in range(axes)},
                        False, {}), base


def _spec_argv(world: World, kind: str, broken: Broken) -> tuple[str, list[str], tuple[str, ...]]:
    spec = {"name": "gen", "experiment": "gen", "base": world.base(), "grid": {"weighting.method": ["none"]}}
    extra: list[str] = []
    if kind == "base":
        config, extra = world.config_with(broken)
        spec["base"] = config
        names = _names(broken)
    elif kind == "grid":
        spec["base"] = _merge(spec["base"], broken.extra_overrides)
        spec["grid"] = {broken.field: [broken.value]}
        names = _names(broken)
    elif kind == "spec":
        if broken.via_set:
            extra = ["--set", f"{broken.field}={_yaml_value(broken.value)}"]
        else:
            _set_dotted(spec, broken.field, broken.value)
        names = _names(broken)
    elif kind == "grid_shape":
        spec["grid"] = broken.value
        names = ("grid",)
    else:
        spec["grid"] = broken.value
        names = ("grid", "max_trials")
    return world.write("spec.yaml", spec), extra, names


@_settings("run")
@given(case=broken_spec())
def test_generated_invalid_specs_to_run_fail_before_anything_is_created(case, synthetic_voc, capsys, tmp_path):
    kind, broken, _ = case
    world = World(synthetic_voc)
    try:
        spec, extra, names = _spec_argv(world, kind, broken)
        code, out, err = _invoke(["run", spec, "--runs-dir", str(world.runs), "--quiet", *extra], capsys)
        _check_error(code, out, err, names=names)
        assert world.created() == []
        assert not (tmp_path / "alwa_runs").exists()
    finally:
        world.close()
    _counts["run"] += 1


random_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), unicode_text)
random_values = st.recursive(random_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(unicode_text, inner, max_size=3)), max_leaves=8)
FIELDS = [field for field, _, _ in INVALID_FIELDS] + [
    "model.backbone", "model.pretrained", "schedule.steps", "schedule.unit", "optimizer.type", "weighting.cls",
    "dataset.root", "dataset.train_sets", "resources.workers", "seeds", "grid", "name", "experiment",
    "scheduler.type", "max_concurrent", "estimate.hours_per_trial"]


@_settings("validate")
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), random_values, st.booleans()), min_size=1, max_size=3),
       check_paths=st.booleans())
def test_generated_specs_validate_or_fail_with_one_paragraph(mutations, check_paths, synthetic_voc, capsys):
    """Random values (any type) in random fields, in the file or with --set: valid → 0, else 2."""
    world = World(synthetic_voc)
    try:
        spec = {"name": "gen", "base": world.base(), "grid": {"weighting.method": ["none"]}}
        extra: list[str] = []
        for field, value, via_set in mutations:
            top = field.split(".")[0] in ("resources", "seeds", "grid", "name", "experiment", "scheduler",
                                          "max_concurrent", "estimate")
            if via_set:
                extra += ["--set", f"{field}={_yaml_value(value)}"]
            elif top:
                _set_dotted(spec, field, value)
            else:
                _set_dotted(spec["base"], field, value)
        argv = ["validate", world.write("spec.yaml", spec), *extra] + (["--check-paths"] if check_paths else [])
        code, out, err = _invoke(argv, capsys)
        if code == 0:
            _counts["validate_valid"] = _counts.get("validate_valid", 0) + 1
            assert out.rstrip().endswith("valid") and not err.strip()
        else:
            _check_error(code, out, err)
        assert world.created() == []
    finally:
        world.close()
    _counts["validate"] += 1


def test_generated_inputs_are_counted(figures):
    """Runs last in this file: records how many generated inputs the properties above tried."""
    assert all(_counts[name] > 0 for name in EXAMPLES), _counts
    figures.record("generated_cli", examples={name: _counts[name] for name in EXAMPLES},
                   total=sum(_counts[name] for name in EXAMPLES), validate_valid=_counts.get("validate_valid", 0))
