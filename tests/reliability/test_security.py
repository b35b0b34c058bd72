"""Security: static checks over the repository's Python, and the behaviour behind them
(safe YAML, safe checkpoints, the UI on loopback, spec paths resolved and checked)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

from alwa_sweep.cli import build_parser, main
from alwa_sweep.commands.ui import is_loopback, server_command
from alwa_sweep.spec import load_spec
from alwa_sweep.tracking import artifact_root
from trainers.config import load_config
from trainers.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", "__pycache__", "build", "dist", "node_modules", "alwa_runs", "alwa_demo", ".pytest_cache"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader"}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def python_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(REPO):
        # virtual environments (CI's .ci-venv included) hold other people's code
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith("venv") and d != "site-packages"]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files)


def _name(node) -> str:
    """``a.b.c`` for Name/Attribute chains, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_string_expression(node) -> bool:
    """A command given as one string (literal, f-string, concatenation, .format, %)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_string_expression(node.left) or _is_string_expression(node.right)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def findings(tree: ast.AST) -> dict[str, list[int]]:
    """Line numbers of each unsafe pattern in one module."""
    found: dict[str, list[int]] = {check: [] for check in CHECKS}
    torch_load_names = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cPickle", "dill", "marshal", "shelve"):
            found["pickle / marshal / shelve loads"].append(node.lineno)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _name(loader).split(".")[-1] not in SAFE_LOADERS:
                found["yaml.load without a safe loader"].append(node.lineno)
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found["yaml.load without a safe loader"].append(node.lineno)
        if name.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib") and \
                name.split(".")[-1] in ("load", "loads", "Unpickler", "open"):
            found["pickle / marshal / shelve loads"].append(node.lineno)
        if name in ("pandas.read_pickle", "pd.read_pickle") or \
                name in ("numpy.load", "np.load") and _is_true(_keyword(node, "allow_pickle")):
            found["pickle / marshal / shelve loads"].append(node.lineno)
        if name in torch_load_names and not _is_true(_keyword(node, "weights_only")):
            found["torch.load without weights_only=True"].append(node.lineno)
        if _is_true(_keyword(node, "shell")):
            found["shell=True"].append(node.lineno)
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                    "commands.getoutput"):
            found["os.system / os.popen / getoutput"].append(node.lineno)
        if name.startswith("subprocess.") and name.split(".")[-1] in SUBPROCESS_CALLS and node.args and \
                _is_string_expression(node.args[0]):
            found["a command built as one string"].append(node.lineno)
        if name in ("eval", "exec"):
            found["eval / exec"].append(node.lineno)
    return found


CHECKS = ("yaml.load without a safe loader", "pickle / marshal / shelve loads",
          "torch.load without weights_only=True", "shell=True", "os.system / os.popen / getoutput",
          "a command built as one string", "eval / exec")


def test_the_checker_flags_each_unsafe_pattern():
    """The AST checks themselves, on code that does each wrong thing once."""
    bad = ast.parse("\n".join([
        "yaml.load(text)", "yaml.load(text, Loader=yaml.FullLoader)", "yaml.unsafe_load(text)",
        "pickle.loads(blob)", "from torch import load as tl", "tl(path)",
        "torch.load(path)", "torch.load(path, weights_only=False)",
        "subprocess.run(cmd, shell=True)", "os.system(cmd)", "os.popen(cmd)",
        "subprocess.run(f'ls {user}')", "subprocess.Popen('ls ' + user)", "eval(text)",
    ]))
    good = ast.parse("\n".join([
        "yaml.safe_load(text)", "yaml.load(text, Loader=yaml.SafeLoader)", "torch.load(p, weights_only=True)",
        "subprocess.run(['ls', user])", "subprocess.Popen([sys.executable, '-m', 'mlflow'])", "model.eval()",
    ]))
    counts = {check: len(lines) for check, lines in findings(bad).items()}
    assert counts == {"yaml.load without a safe loader": 3, "pickle / marshal / shelve loads": 1,
                      "torch.load without weights_only=True": 3, "shell=True": 1,
                      "os.system / os.popen / getoutput": 2, "a command built as one string": 2,
                      "eval / exec": 1}
    assert all(not lines for lines in findings(good).values())


def test_no_unsafe_loading_or_shell_in_the_repository(figures):
    files = python_files()
    problems = {check: [] for check in CHECKS}
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for check, lines in findings(tree).items():
            problems[check] += [f"{path.relative_to(REPO)}:{line}" for line in lines]
    torch_loads = sum(1 for path in files for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(node, ast.Call) and _name(node.func) == "torch.load")
    figures.record("security", files_scanned=len(files),
                   checks={check: len(where) for check, where in problems.items()},
                   findings=sum(len(where) for where in problems.values()), torch_loads_checked=torch_loads)
    assert len(files) > 50 and (REPO / "trainers" / "checkpoint.py") in files
    assert torch_loads >= 2  # the checkpoint and ImageNet-weight loaders were looked at
    assert {check: where for check, where in problems.items() if where} == {}


def test_yaml_tags_that_would_run_code_are_refused(tmp_path, figures):
    marker = tmp_path / "code_ran"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: evil\nbase: !!python/object/apply:os.system ['touch {marker}']\ngrid: {{}}\n")
    with pytest.raises(ConfigError, match="constructor for the tag|not valid YAML"):
        load_spec(spec)
    code = main(["validate", str(spec)])
    figures.add_row("security", {"check": "a spec holding `!!python/object/apply:os.system [...]`",
                                 "result": f"refused by yaml.safe_load (exit code {code}); the command did not run"})
    assert code == 2
    assert not marker.exists()


def test_ui_binds_loopback_by_default_and_offers_basic_auth(figures):
    args = build_parser(["ui"]).parse_args(["ui"])
    assert args.host == "127.0.0.1" and not args.allow_remote and not args.basic_auth
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")
    command = server_command("sqlite:////tmp/s/mlflow.db", "10.0.0.5", 5000, basic_auth=True)
    assert isinstance(command, list) and command[command.index("--app-name") + 1] == "basic-auth"
    assert command[command.index("--host") + 1] == "10.0.0.5"  # one argument, never parsed by a shell
    readme = (REPO / "README.md").read_text()
    figures.add_row("security", {"check": "`alwa-sweep ui`", "result": (
        f"binds {args.host} unless told otherwise; a non-loopback --host needs --allow-remote (exit code 2 "
        "without it: tests/reports/test_ui.py and the bad-input table); --basic-auth serves MLflow's basic-auth app "
        "and needs its secrets in the environment; the README documents it for shared servers")})
    assert "--app-name basic-auth" in readme and "alwa-sweep ui --basic-auth" in readme


def _spec(root: str, **dataset) -> dict:
    return {"name": "paths", "base": {
        "dataset": {"kind": "voc", "root": root, "train_sets": ["2007/trainval"], "test_sets": ["2007/test"],
                    "scale": [64, 64], "num_workers": 0, **dataset},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "schedule": {"unit": "iter", "max_iters": 4, "steps": [3], "warmup_iters": 1}},
        "grid": {"weighting.method": ["none"]}}


@pytest.mark.parametrize("root", ["../..", "../../../../../../etc", "/etc", "~"])
def test_dataset_paths_from_specs_are_resolved_then_checked(root, tmp_path, monkeypatch, figures):
    """A root that climbs out or points at a system folder is resolved to an absolute
    path and must hold the VOC layout; it is never used as given."""
    work = tmp_path / "x" / "y"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(DatasetError) as error:
        load_spec(_spec(root))
    resolved = os.path.abspath(os.path.expanduser(root))
    message = str(error.value)
    figures.add_row("security", {"check": f"dataset `root: {root}` in a spec",
                                 "result": f"resolved to `{resolved.replace(str(tmp_path), '<tmp>')}`, then "
                                           f"refused: {error.value.problem}".replace(str(tmp_path), "<tmp>")})
    assert resolved in message and ".." not in message.split("does not exist")[0]
    assert "VOC2007" in message or "folder does not exist" in message


def test_relative_dataset_paths_resolve_against_the_launch_directory(synthetic_voc, tmp_path, monkeypatch,
                                                                     figures):
    """Tune runs each trial in its own folder: what the driver checked must be what the
    trial opens (end to end in test_faults.py's SIGKILL sweep, whose root is relative)."""
    (tmp_path / "data").symlink_to(Path(synthetic_voc["root"]).parent)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_spec("data/VOCdevkit"))
    expected = str(tmp_path / "data" / "VOCdevkit")
    assert spec.base["dataset"]["root"] == expected  # what spec.yaml keeps for `resume`
    assert [t.config.dataset.root for t in spec.trials] == [expected]
    config = load_config(_spec("data/VOCdevkit")["base"])
    assert config.dataset.root == expected
    coco = load_config(_spec(None, kind="coco", train_ann="a.json", train_images="imgs", val_ann="b.json",
                                val_images="imgs")["base"])
    assert coco.dataset.train_ann == str(tmp_path / "a.json")
    assert coco.dataset.val_images == str(tmp_path / "imgs")
    figures.add_row("security", {"check": "relative dataset paths (`root: data/VOCdevkit`, COCO files)",
                                 "result": "made absolute against the launch directory when the spec or config "
                                           "is read, so a Tune trial (run in its own folder) opens what the "
                                           "driver checked; the SIGKILL sweep runs with a relative root"})


def test_names_from_specs_cannot_leave_their_folder(tmp_path, figures):
    for name in ("../../etc", "a/b", ".."):
        with pytest.raises(ConfigError, match="name"):
            load_spec({**_spec("/nonexistent"), "name": name}, check_paths=False)
        location = Path(artifact_root(f"sqlite:///{tmp_path}/mlflow.db", name).removeprefix("file://"))
        assert location.parent == tmp_path / "artifacts", name
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(_spec("/nonexistent")))
    assert main(["run", str(spec_path), "--no-check-paths", "--name", "../escape", "--runs-dir",
                 str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "escape").exists()
    figures.add_row("security", {"check": "names used as folders (`name`, `--name`, `--run-name`, experiment)",
                                 "result": "sweep and run names `../../etc`, `a/b`, `..` refused (exit code 2); "
                                           "an experiment name maps to one folder under `artifacts/`"})
