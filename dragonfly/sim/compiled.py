"""
The piece picker compiled by mypyc, for the simulator's large runs.

The picker (L{dragonfly.peer.picker}) is most of a large run's CPU.  With
C{python -m dragonfly.sim --compiled-picker} the simulator builds that
module with mypyc (in the C{test} extra, with mypy; it needs a C compiler)
into a cache directory keyed by the module's source, and loads it in place
of the pure one before anything imports it.  It is the same source, so the
same decisions: the runs are the same, only faster.  Nothing else loads
it: the dfpeer and the tests import the pure module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

MODULE = "dragonfly.peer.picker"
#: mypyc's runtime module for a one-module build (the shim imports it by this name)
RUNTIME = MODULE + "__mypyc"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dragonfly-sim"


def source() -> Path:
    """The pure module's file (found without importing it)."""
    root = Path(__file__).resolve().parent.parent
    return root / "peer" / "picker.py"


def key(text: bytes) -> str:
    """The build's cache key: the source, the Python and the mypy that compile it."""
    try:
        import mypy.version

        mypy_version = mypy.version.__version__
    except ImportError:  # pragma: no cover - no mypy: build() says so
        mypy_version = "none"
    h = hashlib.sha256(text)
    h.update(f"{sys.version}|{sysconfig.get_config_var('EXT_SUFFIX')}|{mypy_version}".encode())
    return h.hexdigest()[:16]


def build(cache: Path | None = None) -> Path:
    """The directory holding the compiled picker for the current source (built once)."""
    src = source()
    out = (cache or cache_root()) / key(src.read_bytes())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if (out / ("picker" + suffix)).exists() and (out / ("picker__mypyc" + suffix)).exists():
        return out
    mypyc = shutil.which("mypyc", path=str(Path(sys.executable).parent)) or shutil.which("mypyc")
    if mypyc is None:
        raise RuntimeError("mypyc is not installed (pip install mypy)")
    package = src.parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        # a copy of the package: mypyc writes its build and the modules in place
        shutil.copytree(package, Path(tmp) / "dragonfly", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        done = subprocess.run(
            [mypyc, "dragonfly/peer/picker.py"], cwd=tmp, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mypyc failed:\n{done.stdout}{done.stderr}")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent))
        for name in ("picker", "picker__mypyc"):
            shutil.copy2(Path(tmp) / "dragonfly" / "peer" / (name + suffix), staging / (name + suffix))
        try:
            staging.rename(out)
        except OSError:  # built meanwhile by another run
            shutil.rmtree(staging, ignore_errors=True)
    return out


def load(cache: Path | None = None) -> ModuleType:
    """
    Build (when needed) and load the compiled picker as L{dragonfly.peer.picker};
    call before the simulator's modules are imported.
    """
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        if compiled(loaded):
            return loaded
        raise RuntimeError(f"{MODULE} was imported already: load the compiled one first")
    out = build(cache)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    import dragonfly.peer

    module: ModuleType | None = None
    for name, file in ((RUNTIME, "picker__mypyc"), (MODULE, "picker")):
        spec = importlib.util.spec_from_file_location(name, out / (file + suffix))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    assert module is not None
    dragonfly.peer.picker = module  # type: ignore[attr-defined]
    return module


def compiled(module: ModuleType) -> bool:
    return str(getattr(module, "__file__", "")).endswith(sysconfig.get_config_var("EXT_SUFFIX") or ".so")
