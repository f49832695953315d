"""The runtime core must never pull in the training stack."""

import json
import pkgutil
import subprocess
import sys

import finers_rt

FORBIDDEN = ("torch", "transformers", "segment_anything", "torchvision", "optimum")


def core_modules():
    names = []
    for info in pkgutil.walk_packages(finers_rt.__path__, "finers_rt."):
        if info.name.startswith(("finers_rt.export", "finers_rt.train")):
            continue
        names.append(info.name)
    return names


def test_core_imports_without_torch():
    modules = core_modules()
    assert "finers_rt.cli" in modules and "finers_rt.parsing" in modules
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "import finers_rt\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_cli_help_runs_without_torch():
    code = ("import sys\nfrom finers_rt.cli import app\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"print([m for m in {FORBIDDEN!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
