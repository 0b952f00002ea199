"""Every module of sgex imports, `runtime` imports without the heavy libraries, and every console
script's --help works without importing torch, onnx, onnxruntime, triton or tensorrt
(Polygraphy's habit: a tool's -h must run on the base install).

The "without" checks run in a fresh interpreter with a sys.meta_path finder that refuses the
heavy packages, so a stray module-level import fails loudly instead of passing on a machine that
happens to have everything installed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "export", "runtime", "calib", "bench")
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxruntime_extensions", "triton", "tensorrt",
         "polygraphy", "dlib", "scipy", "PIL", "skimage", "av", "ray", "tritonclient", "openvino")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    HEAVY = {HEAVY!r}
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"blocked heavy import: {{name}}")
            return None
    sys.meta_path.insert(0, _Block())
""")


def _modules(package: str) -> list[str]:
    pkg_dir = ROOT / package
    if not (pkg_dir / "__init__.py").is_file():
        return []
    return [package] + sorted(m.name for m in pkgutil.walk_packages([str(pkg_dir)], prefix=package + "."))


def _console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: name -> "module:function"."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        return dict(tomllib.loads(text)["project"]["scripts"])
    except ImportError:  # Python 3.10: the table is simple enough to read with a pattern
        block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
        return dict(re.findall(r'^\s*([\w-]+)\s*=\s*"([^"]+)"', block, re.M))


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


ALL_MODULES = [m for p in PACKAGES for m in _modules(p)]


@pytest.mark.parametrize("module", ALL_MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_runtime_imports_without_heavy_libraries():
    mods = _modules("runtime")
    assert {"runtime.engine", "runtime.cli", "runtime.faces", "runtime.recipes", "runtime.serve"} <= set(mods)
    code = textwrap.dedent(f"""
        import importlib, sys
        for m in {mods!r}:
            importlib.import_module(m)
        import runtime
        from runtime.engine import Engine
        from runtime.backends import create
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in HEAVY)
        assert not leaked, leaked
        print("ok", len({mods!r}))
    """)
    r = _python(code)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_blocker_really_blocks():
    r = _python("import torch")
    assert r.returncode != 0 and "blocked heavy import: torch" in r.stderr


def _help_without_heavy(module: str, func: str) -> str:
    """Run module.func(["--help"]) with the heavy libraries blocked; returns its stdout."""
    code = textwrap.dedent(f"""
        import sys
        from {module} import {func} as main
        try:
            rc = main(["--help"])
        except SystemExit as e:
            rc = e.code
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in HEAVY)
        assert rc in (0, None), rc
        assert not leaked, leaked
    """)
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("script", ["sgex-run", "sgex-export", "sgex-bench", "sgex-calib", "sgex-serve",
                                    "sgex-triton"])
def test_console_script_help_without_heavy_libraries(script):
    scripts = _console_scripts()
    assert script in scripts, f"{script} is not declared in pyproject.toml"
    module, func = scripts[script].split(":")
    if importlib.util.find_spec(module.split(".")[0]) is None or not (ROOT / (module.replace(".", "/") + ".py")).is_file():
        pytest.skip(f"{module} ({script}) is not written yet")
    out = _help_without_heavy(module, func)
    assert "usage:" in out and "--help" in out, out[:500]


@pytest.mark.parametrize("module", ["bench.gpu.kernel_bench", "bench.gpu.profile", "bench.gpu.report"])
def test_gpu_script_helpers_help_without_heavy_libraries(module):
    # bench/gpu/run.sh's helpers are `python3 -m` tools: their --help works on the base install too.
    out = _help_without_heavy(module, "main")
    assert "usage:" in out and "example" in out, out[:500]
