"""The package a user installs into an environment they already have (README: "Installing into
your own environment").

* The requirements declared in pyproject.toml are the third-party imports of every module of
  distrib/ and launch/ (read with ast), so the two cannot drift apart.
* ``python -m build`` makes an sdist and a wheel; the wheel installs into a fresh environment that
  already has torch and Horovod, and from a folder outside the checkout the installed
  ``distrib-launch`` trains on 2 workers and ``python -m distrib.report`` reads the run.
* ``DISTRIB_PYTHON=... scripts/bootstrap.sh`` keeps the Horovod that environment has.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

from tests.helpers import REPO, SCRIPTS

PACKAGES = ("distrib", "launch")
# The user's, never declared: pip must not pick or replace the machine's torch build, and Horovod
# must be compiled against that torch.
USERS_OWN = {"torch", "horovod"}
# Modules inside the user's packages that another distribution provides.
SUBMODULE_DISTS = {"torch.utils.tensorboard": "tensorboard"}
FEATURE_EXTRAS = ("report", "tensorboard", "export", "mpi")
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception"}


def source_version() -> str:
    """The version as written in distrib/_version.py (the one place)."""
    namespace: dict = {}
    exec((REPO / "distrib" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """``"pytest-timeout>=2"`` -> ``"pytest-timeout"`` (PEP 503 normalised); extras dropped."""
    return canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def declared() -> tuple[set, dict]:
    """(install_requires, {extra: requirement names}) from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    return {requirement_name(r) for r in project["dependencies"]}, extras


class _Imports(ast.NodeVisitor):
    """Absolute imports of one module as (dotted name, lazy): lazy when it runs only inside a
    function or under a ``try`` that catches its ImportError, i.e. importing the module does not
    need it."""

    def __init__(self):
        self.found: list[tuple[str, bool]] = []
        self._lazy = 0

    def _nested(self, node):
        self._lazy += 1
        self.generic_visit(node)
        self._lazy -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_Try(self, node):
        caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        guarded = any(name in IMPORT_ERRORS for c in caught for name in re.findall(r"\w+", c)) or \
            any(h.type is None for h in node.handlers)
        if guarded:
            self._lazy += 1
            for stmt in node.body:
                self.visit(stmt)
            self._lazy -= 1
            for part in (*node.handlers, *node.orelse, *node.finalbody):
                self.visit(part)
        else:
            self.generic_visit(node)

    def visit_Import(self, node):
        self.found += [(alias.name, self._lazy > 0) for alias in node.names]

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:
            self.found.append((node.module, self._lazy > 0))


def third_party_imports() -> list[tuple[str, str, str, bool]]:
    """(module file, import, distribution, lazy) for every import of distrib/ and launch/ that is
    neither the standard library, nor distrib/launch, nor torch/Horovod themselves."""
    owners = importlib.metadata.packages_distributions()
    rows = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            visitor = _Imports()
            visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            for name, lazy in visitor.found:
                top = name.split(".")[0]
                dist = next((d for prefix, d in SUBMODULE_DISTS.items() if name == prefix or name.startswith(prefix + ".")),
                            None)
                if dist is None:
                    if top in sys.stdlib_module_names or top in PACKAGES or top in USERS_OWN:
                        continue
                    dist = owners.get(top, [top])[0]
                rows.append((str(path.relative_to(REPO)), name, canonical(dist), lazy))
    return rows


def test_every_third_party_import_is_declared():
    required, extras = declared()
    optional = set().union(*(extras[name] for name in FEATURE_EXTRAS))
    problems = []
    for where, name, dist, lazy in third_party_imports():
        if dist in required:
            continue
        if not lazy:
            problems.append(f"{where} imports {name} when imported: add {dist!r} to [project] dependencies")
        elif dist not in optional:
            problems.append(f"{where} imports {name} on demand: add {dist!r} to an extra in "
                            f"[project.optional-dependencies] ({', '.join(FEATURE_EXTRAS)})")
    assert not problems, "pyproject.toml does not declare what the code imports:\n" + "\n".join(problems)


def test_every_declaration_is_used_and_setup_installs_it():
    """No stale requirement; `pip install distrib[test]` and `make setup` bring every declared one."""
    required, extras = declared()
    imported = {dist for _, _, dist, _ in third_party_imports()}
    assert required <= imported, f"declared but imported nowhere: {sorted(required - imported)}"
    for name in FEATURE_EXTRAS:
        assert extras[name] & imported, f"extra {name!r} ({sorted(extras[name])}) is imported nowhere"
    with open(REPO / "pyproject.toml", "rb") as f:
        test_extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    itself = [r for r in test_extra if requirement_name(r) == "distrib"]
    assert itself and set(re.search(r"\[(.*)\]", itself[0]).group(1).replace(" ", "").split(",")) >= \
        set(FEATURE_EXTRAS), f"the test extra must pull in every feature extra: {test_extra}"
    # What bootstrap.sh step 3 installs (its pip line), so that `make test` has every feature.
    pip_line = next(line for line in (REPO / "scripts" / "bootstrap.sh").read_text().splitlines()
                    if "logged pip-deps" in line)
    installed = {canonical(word) for word in pip_line.split()}
    wanted = required | set().union(*extras.values()) - {"distrib"}
    assert wanted <= installed, f"scripts/bootstrap.sh does not install {sorted(wanted - installed)}"


def test_launcher_version_is_distribs_and_needs_no_torch():
    code = ("import sys, contextlib, io\n"
            "from launch.cli import config_from_args\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try: config_from_args(['--version'])\n"
            "    except SystemExit as e: assert e.code == 0, e.code\n"
            "print(out.getvalue().strip(), 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["distrib-launch", source_version(), "False"]


# -- the built package, installed outside the checkout ---------------------------------------

@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) from `python -m build` (the wheel built from the sdist, as PyPI users get it);
    --no-isolation: the build requirements are the set-up's, no download."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists, wheels = sorted(out.glob("distrib-*.tar.gz")), sorted(out.glob("distrib-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0]


# Where this test's interpreter (the set-up's environment, with torch and Horovod) keeps its packages.
OWN_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def site_packages(venv_root: Path) -> Path:
    return venv_root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def user_environment(root: Path, reuse: Path) -> Path:
    """A fresh virtual environment whose interpreter also sees the packages in ``reuse`` (a plain
    path line in a .pth file), the way --system-site-packages shows a base interpreter's: this
    test's torch and Horovod are reused, not rebuilt. (--system-site-packages itself cannot do it:
    a venv made from a venv has the real interpreter as its base.) A path line does not run the
    .pth files found there, so the checkout's editable distrib is not importable in it."""
    venv.EnvBuilder(with_pip=False).create(root)
    (site_packages(root) / "_reused_environment.pth").write_text(f"{reuse}\n")
    return root


def install_horovodrun(env: Path) -> None:
    """The horovodrun script that installing Horovod into ``env`` would have written."""
    source = Path(sys.executable).with_name("horovodrun").read_text().splitlines(keepends=True)
    target = env / "bin" / "horovodrun"
    target.write_text(f"#!{env / 'bin' / 'python'}\n" + "".join(source[1:]))
    target.chmod(0o755)


def user_run(env: Path, cwd: Path, *cmd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``cmd`` as a user of ``env`` runs it: its bin first on PATH, in ``cwd``, no PYTHONPATH."""
    test_bin = str(Path(sys.executable).parent)
    path = [str(env / "bin")] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != test_bin]
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_env["PATH"] = os.pathsep.join(path)
    return subprocess.run(list(cmd), cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_the_wheel_works_outside_the_checkout(dists, tmp_path):
    sdist, wheel = dists
    version = source_version()
    assert (sdist.name, wheel.name) == (f"distrib-{version}.tar.gz", f"distrib-{version}-py3-none-any.whl")
    env = user_environment(tmp_path / "env", OWN_PACKAGES)
    # --no-index: the requirements must already be there (the reused environment has them);
    # pip sees the checkout's editable distrib in the reused folder and leaves it alone.
    ok(user_run(env, tmp_path, str(env / "bin" / "python"), "-m", "pip", "install", "--no-index", str(wheel)))
    install_horovodrun(env)
    work = tmp_path / "work"  # outside the checkout, holding only the user's scripts
    work.mkdir()
    shutil.copy(REPO / "examples" / "train_mlp.py", work)
    shutil.copy(SCRIPTS / "installed_run.py", work)

    assert ok(user_run(env, work, "distrib-launch", "--version")).stdout.strip() == f"distrib-launch {version}"
    # The launcher is the installed one (the workers report their distrib below).
    launcher = ok(user_run(env, work, "python", "-c", "import launch; print(launch.__file__)")).stdout.strip()
    assert Path(launcher).is_relative_to(site_packages(env)), launcher

    mlp = ok(user_run(env, work, "distrib-launch", "-np", "2", "train_mlp.py"))
    assert f"{env / 'bin' / 'python'} -m launch.worker train_mlp.py" in mlp.stderr, mlp.stderr
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([\d.]+)", mlp.stdout, re.M)]
    assert len(losses) == 6 and losses[-1] < losses[0], mlp.stdout

    ok(user_run(env, work, "distrib-launch", "-np", "2", "installed_run.py", "run"))
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["event"] == "final" and final["world_size"] == 2 and final["distrib_version"] == version
    assert Path(final["distrib_file"]).is_relative_to(site_packages(env)), final
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40]

    report = ok(user_run(env, work, "python", "-m", "distrib.report", "run"))
    for name in ("loss_lr.png", "summary.txt"):
        assert (work / "run" / "report" / name).stat().st_size > 0, report.stdout
    assert "wrote" in report.stdout

    # The checkout's own environment still has its editable distrib.
    here = subprocess.run([sys.executable, "-c", "import distrib; print(distrib.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert Path(here.stdout.strip()).is_relative_to(REPO), here.stdout + here.stderr


@pytest.mark.timeout(300)
def test_an_environment_without_horovod_gets_one_line(dists, tmp_path):
    """torch there, Horovod not: the launcher stops before starting anything, in one line."""
    reuse = tmp_path / "no-horovod"  # the test's site-packages without Horovod (and without distrib)
    reuse.mkdir()
    for entry in OWN_PACKAGES.iterdir():
        if not re.match(r"(horovod|distrib|__editable__)", entry.name, re.I):
            (reuse / entry.name).symlink_to(entry)
    env = user_environment(tmp_path / "env", reuse)
    ok(user_run(env, tmp_path, str(env / "bin" / "python"), "-m", "pip", "install", "--no-index", str(dists[1])))
    shutil.copy(REPO / "examples" / "train_mlp.py", tmp_path)
    proc = user_run(env, tmp_path, "distrib-launch", "-np", "2", "train_mlp.py", timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Horovod with PyTorch support cannot be imported" in lines[0], lines[0]
    assert "Installing into your own environment" in lines[0], lines[0]
    # A script started some other way: distrib.init() raises one line naming the same fix.
    proc = user_run(env, tmp_path, "python", "-c", "import distrib; distrib.init()", timeout=120)
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(
        "distrib.DistribSetupError: Horovod with PyTorch support is not importable "
        "(No module named 'horovod')") and "Installing into your own environment" in last, proc.stderr


# -- the set-up keeps the Horovod of an environment it is given --------------------------------

def test_setup_keeps_an_existing_horovod(tmp_path):
    """DISTRIB_PYTHON=<this test's python>: its Horovod has PyTorch and both controllers, so the
    set-up says so in one line and builds nothing."""
    lib = next((Path(importlib.util.find_spec("horovod").origin).parent / "torch").glob("mpi_lib_v2*.so"))
    before = lib.stat()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "DISTRIB_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    kept = [line for line in lines if "Horovod" in line]
    assert kept == [f"[bootstrap] keeping the Horovod of {sys.executable}: horovodrun --check-build lists "
                    "PyTorch, MPI, Gloo; not rebuilding it"], proc.stdout
    assert not any(line.startswith(("[bootstrap] building", "[bootstrap] installing")) for line in lines), proc.stdout
    assert lines[-1].startswith("[bootstrap] ready: torch ") and lines[-1].endswith(
        f"distrib {source_version()}"), lines
    assert (lib.stat().st_mtime, lib.stat().st_size) == (before.st_mtime, before.st_size)


def test_setup_rejects_a_python_that_is_not_one(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DISTRIB_PYTHON": str(tmp_path / "python")})
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"[bootstrap] error: DISTRIB_PYTHON={tmp_path / 'python'} is not a Python "
                                        "3.9+ interpreter; give the path of your environment's python"]
