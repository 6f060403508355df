"""The model repository: Triton's layout, `<repo>/<model>/config.pbtxt` and `<repo>/<model>/<version>/<file>`."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from kernelport.errors import ConfigError
from kernelport.repository.config import CONFIG_FILENAME, model_config_class, parse_config

__all__ = [
    "PLATFORMS",
    "ModelEntry",
    "load_model",
    "load_repository",
    "platform_of",
    "validate_model_name",
]

log = logging.getLogger(__name__)

# normalised platform -> (Triton platform, Triton backend, default model file name)
PLATFORMS: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
    "pytorch": ("pytorch_libtorch", "pytorch", "model.pt"),
    "tensorflow": ("tensorflow_savedmodel", "tensorflow", "model.savedmodel"),
    "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan"),
}
_BY_PLATFORM = {platform: norm for norm, (platform, _, _) in PLATFORMS.items()}
_BY_PLATFORM["tensorflow_graphdef"] = "tensorflow"
_BY_BACKEND = {backend: norm for norm, (_, backend, _) in PLATFORMS.items()}
# Files whose presence in a version directory tells the platform when the config does not.
_FILE_PLATFORMS: tuple[tuple[str, str], ...] = (
    ("model.onnx", "onnxruntime"),
    ("model.pt", "pytorch"),
    ("model.pt2", "pytorch"),
    ("model.savedmodel", "tensorflow"),
    ("model.plan", "tensorrt"),
)
_EXT_PLATFORMS = {
    ".onnx": "onnxruntime",
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".pt2": "pytorch",
    ".savedmodel": "tensorflow",
    ".graphdef": "tensorflow",
    ".plan": "tensorrt",
    ".engine": "tensorrt",
}
# Files a version directory may hold instead of the platform's default one, when the config names none:
# PyTorch's torch.export / AOTInductor archives (model.pt2) beside TorchScript's model.pt.
_ALTERNATE_FILENAMES: dict[str, tuple[str, ...]] = {"pytorch": ("model.pt2",)}
_VERSION_DIR = re.compile(r"[0-9]+")


def validate_model_name(name: str) -> None:
    """A model name must be a plain directory name: not empty, hidden, `..`, nor holding a separator."""
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or (os.altsep is not None and os.altsep in name)
    ):
        raise ConfigError(f"model name {name!r} is not a plain directory name")


@dataclass(frozen=True)
class ModelEntry:
    """One model directory of a repository, before any framework has looked at its files."""

    name: str
    path: str
    config: Message  # parsed config.pbtxt (empty if absent) with name, platform and backend filled in
    versions: tuple[int, ...]  # every version directory, ascending
    selected_versions: tuple[int, ...]  # those the version policy serves, ascending
    has_config: bool = True
    version_dirs: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def platform(self) -> str:
        return platform_of(self)

    def version_path(self, version: int | None = None) -> str:
        """The directory of a version (default: the highest selected one)."""
        if version is None:
            version = self.selected_versions[-1]
        if version not in self.versions:
            have = ", ".join(str(v) for v in self.versions)
            raise ConfigError(f"model '{self.name}' has no version {version} (versions: {have})")
        return os.path.join(self.path, self.version_dirs.get(version, str(version)))

    def model_file(self, version: int | None = None) -> str:
        """The model file (or directory) of a version: default_model_filename or the platform's default name."""
        if version is None:
            version = self.selected_versions[-1]
        vdir = self.version_path(version)
        cfg = _config(self)
        filename = cfg.default_model_filename or (
            "model.graphdef" if cfg.platform == "tensorflow_graphdef" else PLATFORMS[platform_of(self)][2]
        )
        path = os.path.join(vdir, filename)
        if not os.path.exists(path) and not cfg.default_model_filename:
            for alternate in _ALTERNATE_FILENAMES.get(platform_of(self), ()):
                if os.path.exists(os.path.join(vdir, alternate)):
                    return os.path.join(vdir, alternate)
        if not os.path.exists(path):
            raise ConfigError(f"model '{self.name}' version {version}: {filename} not found")
        return path


def _config(entry: ModelEntry) -> Any:
    return entry.config


def _platform_from_config(cfg: Any, name: str) -> str | None:
    by_platform = by_backend = None
    if cfg.platform:
        by_platform = _BY_PLATFORM.get(cfg.platform)
        if by_platform is None:
            raise ConfigError(
                f"{CONFIG_FILENAME} of model '{name}': platform '{cfg.platform}' is not supported "
                f"(supported: {', '.join(sorted(_BY_PLATFORM))})"
            )
    if cfg.backend:
        by_backend = _BY_BACKEND.get(cfg.backend)
        if by_backend is None:
            raise ConfigError(
                f"{CONFIG_FILENAME} of model '{name}': backend '{cfg.backend}' is not supported "
                f"(supported: {', '.join(sorted(_BY_BACKEND))})"
            )
    if by_platform and by_backend and by_platform != by_backend:
        raise ConfigError(
            f"{CONFIG_FILENAME} of model '{name}': platform '{cfg.platform}' and backend '{cfg.backend}' disagree"
        )
    return by_platform or by_backend


def platform_of(entry: ModelEntry) -> str:
    """The model's framework, "onnxruntime", "pytorch", "tensorflow" or "tensorrt".

    From the config's platform/backend, else from default_model_filename's extension, else from the
    model file present in the newest selected version.
    """
    cfg = _config(entry)
    stated = _platform_from_config(cfg, entry.name)
    if stated:
        return stated
    if cfg.default_model_filename:
        ext = os.path.splitext(cfg.default_model_filename)[1].lower()
        if ext in _EXT_PLATFORMS:
            return _EXT_PLATFORMS[ext]
    for version in reversed(entry.selected_versions):
        vdir = entry.version_path(version)
        for filename, platform in _FILE_PLATFORMS:
            if os.path.exists(os.path.join(vdir, filename)):
                return platform
    files = ", ".join(f for f, _ in _FILE_PLATFORMS)
    raise ConfigError(
        f"model '{entry.name}': cannot tell its framework: {CONFIG_FILENAME} names no platform or backend "
        f"and version {entry.selected_versions[-1]} holds none of {files}"
    )


def _select_versions(cfg: Any, name: str, versions: tuple[int, ...]) -> tuple[int, ...]:
    label = f"{CONFIG_FILENAME} of model '{name}'"
    policy = cfg.version_policy.WhichOneof("policy_choice") if cfg.HasField("version_policy") else None
    if policy is None:
        return versions[-1:]
    if policy == "all":
        return versions
    if policy == "latest":
        n = int(cfg.version_policy.latest.num_versions)
        if n < 1:
            raise ConfigError(f"{label}: version_policy.latest.num_versions must be >= 1, got {n}")
        return versions[-n:]
    wanted = sorted({int(v) for v in cfg.version_policy.specific.versions})
    if not wanted:
        raise ConfigError(f"{label}: version_policy.specific lists no versions")
    missing = [v for v in wanted if v not in versions]
    if missing:
        have = ", ".join(str(v) for v in versions)
        raise ConfigError(
            f"{label}: version_policy.specific lists version {', '.join(map(str, missing))}, "
            f"which has no directory (versions present: {have})"
        )
    return tuple(wanted)


def load_model(repository: str | os.PathLike[str], name: str) -> ModelEntry:
    """Read one model directory of a repository; ConfigError if the name, config or layout is invalid."""
    validate_model_name(name)
    path = os.path.join(os.fspath(repository), name)
    if not os.path.isdir(path):
        raise ConfigError(f"model '{name}' is not in the model repository")

    config_path = os.path.join(path, CONFIG_FILENAME)
    has_config = os.path.isfile(config_path)
    cfg: Any = parse_config(config_path, model_name=name) if has_config else model_config_class()()
    if cfg.name and cfg.name != name:
        raise ConfigError(
            f"{CONFIG_FILENAME} of model '{name}': name '{cfg.name}' must equal the model's directory name"
        )
    cfg.name = name

    version_dirs: dict[int, str] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not _VERSION_DIR.fullmatch(entry.name) or not entry.is_dir():
            continue
        version = int(entry.name)
        if version in version_dirs:
            raise ConfigError(
                f"model '{name}': directories '{version_dirs[version]}' and '{entry.name}' are both version {version}"
            )
        version_dirs[version] = entry.name
    if not version_dirs:
        raise ConfigError(f"model '{name}' has no version directory (expected {name}/1/, {name}/2/, ...)")
    versions = tuple(sorted(version_dirs))

    model = ModelEntry(
        name=name,
        path=path,
        config=cfg,
        versions=versions,
        selected_versions=_select_versions(cfg, name, versions),
        has_config=has_config,
        version_dirs=version_dirs,
    )
    # Fill platform and backend as Triton's auto-complete does, so the ModelConfig RPC shows both.
    platform = platform_of(model)
    if not cfg.platform and not cfg.backend:
        cfg.platform, cfg.backend = PLATFORMS[platform][:2]
    elif not cfg.backend:
        cfg.backend = PLATFORMS[platform][1]
    elif not cfg.platform:
        cfg.platform = PLATFORMS[platform][0]
    return model


def load_repository(
    path: str | os.PathLike[str], errors: dict[str, ConfigError] | None = None
) -> dict[str, ModelEntry]:
    """Scan a Triton-layout repository: one entry per model directory, by name.

    Hidden entries and plain files at the top are skipped. A model that fails raises its ConfigError,
    unless `errors` is given: then it is recorded there (by name) and the others still load.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ConfigError(f"model repository '{root}' is not a directory")
    models: dict[str, ModelEntry] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            models[entry.name] = load_model(root, entry.name)
        except ConfigError as e:
            if errors is None:
                raise
            log.warning("model '%s' not loaded: %s", entry.name, e)
            errors[entry.name] = e
    return models
