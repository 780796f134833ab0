"""The layers hold: who may import whom, read from the source files themselves (``ast``), and
what importing the CLI and the daemon really loads (a fresh interpreter's ``sys.modules``).

The rules are the ones ``flockctl/__init__.py`` states. The checker is tested on a small made-up
tree with one planted violation per rule, so a rule that stopped catching anything would fail.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flockctl import SHARED_LAYER

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

DAEMON = "flockctl.server"
ENGINE = "flockctl.engine"
DASHBOARD = ("flockctl.tui", "flockctl.themes")
#: The CLI's commands: at module level they load neither torch nor textual nor the daemon.
CLI = ("flockctl.cli", "flockctl.commands")
ML = ("torch", "transformers")
#: Loaded only when a collector endpoint is set (flockctl.telemetry.setup imports it then).
OTEL = "opentelemetry"
#: What of it a server may load without an endpoint: FastAPI itself imports OpenTelemetry's API
#: (contexts, no-op tracers), but the SDK, the exporters, protobuf and gRPC stay out.
OTEL_SDK = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto", "grpc",
            "google.protobuf")  # fmt: skip


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module, or a package a name was taken from
    line: int
    #: Runs when the importer is imported: at module level and not only for type checkers.
    at_import: bool

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.target}"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Each package and its folder, as pyproject.toml maps them."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {package: root / folder for package, folder in mapping.items()}


def find_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the project by its import name."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: Iterable[str]) -> list[Import]:
    """Every import statement in one module, wherever it is."""
    known = set(known)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, at_import))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.append(Import(name, base, node.lineno, at_import))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # a submodule taken by name
                    found.append(Import(name, f"{base}.{alias.name}", node.lineno, at_import))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            at_import = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_import)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def under(name: str, prefixes: str | Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or inside one of them."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Project:
    """The modules of a source tree and their imports."""

    def __init__(self, packages: dict[str, Path], shared: Iterable[str]) -> None:
        self.modules = find_modules(packages)
        self.shared = tuple(shared)
        self.imports = {
            name: imports_of(name, path, self.modules) for name, path in self.modules.items()
        }

    def all_imports(self, who: Callable[[str], bool]) -> list[Import]:
        return [i for name, found in self.imports.items() if who(name) for i in found]

    def module_of(self, target: str) -> str | None:
        """The project module an import loads (``a.b.c`` may name ``c`` inside ``a.b``)."""
        while target:
            if target in self.modules:
                return target
            target = target.rpartition(".")[0]
        return None

    def loaded_by(self, root: str) -> dict[str, list[str]]:
        """What importing ``root`` imports, project modules followed through their module-level
        imports (and their parent packages): each name with one chain that leads to it."""
        chains: dict[str, list[str]] = {root: [root]}
        todo = [root]
        while todo:
            name = todo.pop()
            parents = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
            steps = [*parents, *(i.target for i in self.imports.get(name, []) if i.at_import)]
            for target in steps:
                module = self.module_of(target)
                for reached in {target, module} - {None}:
                    if reached not in chains:
                        chains[reached] = [*chains[name], reached]
                        if reached in self.modules:
                            todo.append(reached)
        return chains


# -- the rules ---------------------------------------------------------------------------------


def flockctl_outside(project: Project, who: str, allowed: tuple[str, ...]) -> list[str]:
    """Imports of flockctl modules by ``who`` that are neither its own nor the shared layer."""
    return [
        f"{i} (only {who} and the shared layer)"
        for i in project.all_imports(lambda name: under(name, who))
        if under(i.target, "flockctl")
        and not under(i.target, allowed)
        and i.target not in project.shared
    ]


def daemon_layers(project: Project) -> list[str]:
    return flockctl_outside(project, DAEMON, (DAEMON,))


def engine_layers(project: Project) -> list[str]:
    return flockctl_outside(project, ENGINE, (ENGINE,))


def shared_layer(project: Project) -> list[str]:
    """The shared layer imports nothing of flockctl above it."""
    return [
        f"{i} (the shared layer imports only itself)"
        for i in project.all_imports(lambda name: name in project.shared)
        if under(i.target, "flockctl") and i.target not in project.shared
    ]


def third_party(project: Project, who: Callable[[str], bool], banned: tuple[str, ...]) -> list[str]:
    return [str(i) for i in project.all_imports(who) if under(i.target, banned)]


def daemon_libraries(project: Project) -> list[str]:
    """The daemon runs where there is no GPU stack and no terminal UI, and talks HTTP through
    httpx and its own relaying client only."""
    return third_party(project, lambda n: under(n, DAEMON), (*ML, "textual", "aiohttp"))


def engine_libraries(project: Project) -> list[str]:
    return third_party(project, lambda n: under(n, ENGINE), ("textual",))


def shared_libraries(project: Project) -> list[str]:
    return third_party(project, lambda n: n in project.shared, (*ML, "textual"))


def textual_users(project: Project) -> list[str]:
    return third_party(project, lambda n: not under(n, DASHBOARD), ("textual",))


def ml_users(project: Project) -> list[str]:
    return third_party(project, lambda n: not under(n, ENGINE), ML)


def cli_at_import(project: Project) -> list[str]:
    """What the CLI's modules load just by being imported."""
    problems = []
    for root in sorted(n for n in project.modules if under(n, CLI)):
        for name, chain in project.loaded_by(root).items():
            if under(name, (*ML, "textual", DAEMON)):
                problems.append(" -> ".join(chain))
    return problems


RULES: list[Callable[[Project], list[str]]] = [
    daemon_layers,
    engine_layers,
    shared_layer,
    daemon_libraries,
    engine_libraries,
    shared_libraries,
    textual_users,
    ml_users,
    cli_at_import,
]


@pytest.fixture(scope="module")
def project() -> Project:
    return Project(package_dirs(), SHARED_LAYER)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_flockctl_keeps_its_layers(project: Project, rule: Callable[[Project], list[str]]) -> None:
    assert rule(project) == []


def test_the_shared_layer_names_real_modules(project: Project) -> None:
    assert [name for name in SHARED_LAYER if name not in project.modules] == []


# -- the checker catches what it is there for ---------------------------------------------------

PLANTED = {
    "flockctl/__init__.py": "",
    "flockctl/state.py": "from flockctl.commands import up\n",  # shared layer reaching up
    "flockctl/cli.py": "from flockctl.commands import up\n",
    "flockctl/helper.py": "import torch\n",
    "flockctl/commands/__init__.py": "",
    "flockctl/commands/up.py": (
        "from typing import TYPE_CHECKING\n"
        "from flockctl.helper import tensor\n"  # torch, two steps away
        "if TYPE_CHECKING:\n"
        "    import textual\n"  # not loaded at import, but still outside the dashboard
        "def run():\n"
        "    import flockctl.server.app\n"  # when it runs: fine
    ),
    "flockctl/tui/__init__.py": "import textual.app\n",  # allowed here
    "server/__init__.py": "",
    "server/app.py": "from flockctl.state import read_json\nimport aiohttp\n",
    "server/bad.py": "def later():\n    from flockctl.engine import loop\n",
    "engine/__init__.py": "import torch\n",
    "engine/loop.py": "from flockctl.server import app\nfrom . import helper\n",
    "engine/helper.py": "from ..tui import screens\n",  # relative, still the dashboard
}


@pytest.fixture
def planted(tmp_path: Path) -> Project:
    for relative, text in PLANTED.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    packages = {
        "flockctl": tmp_path / "flockctl",
        "flockctl.commands": tmp_path / "flockctl/commands",
        "flockctl.tui": tmp_path / "flockctl/tui",
        "flockctl.server": tmp_path / "server",
        "flockctl.engine": tmp_path / "engine",
    }
    return Project(packages, ("flockctl", "flockctl.state"))


def test_the_checker_finds_each_planted_violation(planted: Project) -> None:
    found = {rule.__name__: rule(planted) for rule in RULES}
    assert found == {
        "daemon_layers": [
            "flockctl.server.bad:2 imports flockctl.engine (only flockctl.server and the shared"
            " layer)",
            "flockctl.server.bad:2 imports flockctl.engine.loop (only flockctl.server and the"
            " shared layer)",
        ],
        "engine_layers": [
            "flockctl.engine.helper:1 imports flockctl.tui (only flockctl.engine and the shared"
            " layer)",
            "flockctl.engine.loop:1 imports flockctl.server (only flockctl.engine and the shared"
            " layer)",
            "flockctl.engine.loop:1 imports flockctl.server.app (only flockctl.engine and the"
            " shared layer)",
        ],
        "shared_layer": [
            "flockctl.state:1 imports flockctl.commands (the shared layer imports only itself)",
            "flockctl.state:1 imports flockctl.commands.up (the shared layer imports only itself)",
        ],
        "daemon_libraries": ["flockctl.server.app:2 imports aiohttp"],
        "engine_libraries": [],
        "shared_libraries": [],
        "textual_users": ["flockctl.commands.up:4 imports textual"],
        "ml_users": ["flockctl.helper:1 imports torch"],
        "cli_at_import": [
            "flockctl.cli -> flockctl.commands.up -> flockctl.helper -> torch",
            "flockctl.commands.up -> flockctl.helper -> torch",
        ],
    }


# -- what importing really loads ---------------------------------------------------------------


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT / "tests"
    ).stdout
    return set(json.loads(out))


def heavy(modules: set[str], banned: Iterable[str]) -> list[str]:
    return sorted(name for name in modules if under(name, banned))


@pytest.mark.e2e
def test_importing_the_cli_loads_no_torch_textual_or_daemon() -> None:
    banned = (*ML, "textual", DAEMON, "uvicorn", "fastapi", OTEL)
    assert heavy(loaded_after("import flockctl.cli"), banned) == []


@pytest.mark.e2e
def test_importing_the_daemon_loads_no_engine_dashboard_or_aiohttp() -> None:
    banned = (*ML, "textual", ENGINE, *DASHBOARD, "aiohttp", *OTEL_SDK)
    assert heavy(loaded_after("import flockctl.server.__main__"), banned) == []


@pytest.mark.e2e
def test_importing_the_engine_loads_no_opentelemetry() -> None:
    """The engine's server, its engine and its CLI; telemetry is set up only with an endpoint."""
    statement = "import flockctl.engine.api, flockctl.engine.engine, flockctl.engine.cli"
    assert heavy(loaded_after(statement), (*OTEL_SDK, DAEMON, *DASHBOARD)) == []
