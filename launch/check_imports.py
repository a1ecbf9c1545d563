"""Check the import contract in `.importlinter`: layers import only downwards.

The package's folders install under one namespace (pyproject's `package-dir`: train/ becomes
megalora.train, ...), which the import graph cannot follow in an editable install. So the
package is first laid out as installed, by that same mapping, in a temporary folder (sources
only, nothing is built or downloaded), and the contract is checked there. Then every module
must belong to a layer of the contract: a new file that no layer names fails here, instead of
escaping the contract.

Usage: python launch/check_imports.py [REPO_ROOT]; exit status 0 when the contract holds.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

CONFIG = ".importlinter"


def lay_out_package(root: Path, dest: Path) -> None:
    """Copy the package's sources into `dest` as pyproject's package-dir mapping installs them."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    for package in setuptools["packages"]:
        source = root / mapping.get(package, package.replace(".", "/"))
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in source.glob("*.py"):
            shutil.copy2(path, target / path.name)


def layer_modules(config: Path) -> list[str]:
    """Every module named by the `layers` contracts of `config`."""
    parser = configparser.ConfigParser()
    parser.read(config)
    names = []
    for section in parser.sections():
        if parser[section].get("type") == "layers":
            for line in parser[section]["layers"].split("\n"):
                names += [n.strip() for n in line.replace("|", ":").split(":") if n.strip()]
    return names


def unplaced_modules(package_dir: Path, layers: list[str]) -> list[str]:
    """Modules in no layer. A package folder above the layers may stay out if it imports nothing."""
    import grimp

    sys.path.insert(0, str(package_dir))
    try:
        graph = grimp.build_graph("megalora", cache_dir=None)
    finally:
        sys.path.remove(str(package_dir))

    def placed(module: str) -> bool:
        return any(module == layer or module.startswith(layer + ".") for layer in layers)

    def namespace(module: str) -> bool:
        return any(layer.startswith(module + ".") for layer in layers) and \
            not graph.find_modules_directly_imported_by(module)

    return sorted(m for m in graph.modules if not placed(m) and not namespace(m))


def check(root: Path) -> int:
    root = root.resolve()
    with tempfile.TemporaryDirectory(prefix="megalora-imports-") as tmp:
        package_dir = Path(tmp) / "pkg"
        lay_out_package(root, package_dir)
        # Run from the temporary folder with only the laid-out package on the path: the
        # repository's own megalora/ folder (or the editable install) must not be the one found.
        env = {**os.environ, "PYTHONPATH": str(package_dir)}
        code = subprocess.call(
            [sys.executable, "-P", "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
             str(root / CONFIG), "--no-cache", "--no-logo"], cwd=tmp, env=env)
        missing = unplaced_modules(package_dir, layer_modules(root / CONFIG))
    if missing:
        print(f"check_imports: modules in no layer of {CONFIG}: {', '.join(missing)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(check(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
