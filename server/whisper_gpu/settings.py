"""Every setting in one schema: names, types, ranges, defaults and where values come from.

The same specs serve the command line, the environment, the control API, the add-on and the Home Assistant
options flow, so a name or range is written down exactly once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import voluptuous as vol
from faster_whisper.tokenizer import _LANGUAGE_CODES

from .engine import DEFAULT_WINDOW_S, FULL_WINDOW_S
from .errors import CodedError
from .models import KNOWN_MODELS, is_known_model, looks_like_model_reference

_LOGGER = logging.getLogger(__name__)

ENV_PREFIX = "WHISPER_GPU_"
WHISPER_LANGUAGES: tuple[str, ...] = tuple(sorted(_LANGUAGE_CODES))
COMPUTE_TYPES = (
    "auto",
    "float16",
    "bfloat16",
    "int8_float16",
    "int8_bfloat16",
    "int8_float32",
    "int8",
    "float32",
)
ZEROCONF_MODES = ("whisper-gpu", "wyoming", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")
PARK_MODES = ("host_memory", "unload")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# GNU gettext's LANGUAGE (e.g. "en_US:en", "de_DE.UTF-8", "C") is set by desktop sessions; it is no Whisper code.
_LOCALE_LIST_PATTERN = re.compile(r"^(C|POSIX|[a-z]{2,3}([_@.][\w.@-]+)?(:[\w.@-]+)*)$", re.IGNORECASE)


class Source(StrEnum):
    """Where an effective value came from."""

    DEFAULT = "default"
    ENV = "env"
    FLAG = "flag"
    API = "api"


class ErrorCode(StrEnum):
    """Machine-readable reasons a value is refused; clients translate these."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_FIELD = "unknown_field"
    NOT_RUNTIME = "not_runtime"
    INVALID_VALUE = "invalid_value"
    OUT_OF_RANGE = "out_of_range"
    UNKNOWN_MODEL = "unknown_model"
    NOT_SUPPORTED_ON_DEVICE = "not_supported_on_device"
    NOT_SUPPORTED_BY_MODEL = "not_supported_by_model"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    PATH_NOT_ALLOWED = "path_not_allowed"


class SettingError(CodedError, ValueError):
    """A value that the schema refuses, with the setting's name and a code."""

    def __init__(self, name: str, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.name = name
        self.code: ErrorCode = code

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class SettingSpec:
    """One setting: its type, default, allowed values and whether it can change while the server runs."""

    name: str
    kind: type
    default: Any
    description: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], Any] | None = None
    allowed: str | None = None
    runtime: bool = False
    reload: bool = False
    secret: bool = False

    @property
    def env(self) -> str:
        """The bare environment name (the seed's ConfigMap uses these)."""
        return self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    def describe_allowed(self) -> str:
        """What the setting accepts, for error messages."""
        if self.allowed:
            return self.allowed
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        kind = "an integer" if self.kind is int else "a number"
        if self.minimum is not None and self.maximum is not None:
            return f"{kind} from {_plain(self.minimum)} to {_plain(self.maximum)}"
        if self.minimum is not None:
            return f"{kind} of at least {_plain(self.minimum)}"
        return kind

    def validate(self, value: Any) -> Any:
        """Return the value when the schema accepts it (JSON types, no string coercion)."""
        try:
            return self._schema()(value)
        except vol.Invalid as err:
            raise SettingError(self.name, _code_for(err), f"must be {self.describe_allowed()}") from err

    def parse(self, text: str) -> Any:
        """Parse a value given as text (flag or environment) and validate it."""
        text = text.strip()
        value: Any = text
        try:
            if self.kind is bool:
                value = vol.Boolean()(text)
            elif self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
        except (ValueError, vol.Invalid) as err:
            raise SettingError(
                self.name, ErrorCode.INVALID_VALUE, f"must be {self.describe_allowed()}, got {text!r}"
            ) from err
        try:
            return self.validate(value)
        except SettingError as err:
            if self.secret:
                raise
            raise SettingError(self.name, err.code, f"{err.message}, got {text!r}") from err

    def schema_json(self) -> dict[str, Any]:
        """The spec as clients see it in `GET /api/v1/info`."""
        described: dict[str, Any] = {
            "type": _JSON_TYPES[self.kind],
            "default": self.default,
            "reload": self.reload,
            "description": self.description,
        }
        if self.choices:
            described["choices"] = list(self.choices)
        if self.minimum is not None:
            described["min"] = self.minimum
        if self.maximum is not None:
            described["max"] = self.maximum
        return described

    def _schema(self) -> Callable[[Any], Any]:
        validators: list[Any] = [_strict_type(self.kind)]
        if self.choices:
            validators.append(vol.In(self.choices))
        if self.minimum is not None or self.maximum is not None:
            validators.append(vol.Range(min=self.minimum, max=self.maximum))
        if self.check:
            validators.append(self.check)
        return vol.All(*validators)


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _plain(number: float) -> str:
    return f"{number:g}"


def _strict_type(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise vol.Invalid("wrong type")
        return value

    return check


class _UnknownModelError(vol.Invalid):
    pass


def _code_for(err: vol.Invalid) -> ErrorCode:
    if isinstance(err, vol.MultipleInvalid):
        err = err.errors[0]
    if isinstance(err, vol.RangeInvalid):
        return ErrorCode.OUT_OF_RANGE
    if isinstance(err, _UnknownModelError):
        return ErrorCode.UNKNOWN_MODEL
    return ErrorCode.INVALID_VALUE


def _check_model(value: str) -> str:
    try:
        usable = is_known_model(value) or looks_like_model_reference(value)
    except (OSError, RuntimeError) as err:  # a name too long for the file system, `~someone` without a home
        raise _UnknownModelError("unknown model") from err
    if usable:
        return value
    raise _UnknownModelError("unknown model")


def _check_language(value: str) -> str:
    value = value.lower()
    if value == "auto" or value in _LANGUAGE_CODES:
        return value
    raise vol.Invalid("unknown language")


def _check_device(value: str) -> str:
    if _DEVICE_PATTERN.match(value):
        return value
    raise vol.Invalid("unknown device")


def _spec_table(*specs: SettingSpec) -> dict[str, SettingSpec]:
    return {spec.name: spec for spec in specs}


SETTINGS: Mapping[str, SettingSpec] = _spec_table(
    SettingSpec(
        name="model",
        kind=str,
        default="base",
        check=_check_model,
        # Built from the catalogue, so that a model added there is named here too.
        allowed=f"a model name ({', '.join(KNOWN_MODELS)}), "
        "a model directory (a path starting with /, ./, ../ or ~), or a Hugging Face repository id",
        description="Whisper model: a size name, a local CTranslate2 model directory (written as a path) "
        "or a hub repository id",
        runtime=True,
        reload=True,
    ),
    SettingSpec(
        name="language",
        kind=str,
        default="en",
        check=_check_language,
        allowed="a Whisper language code (en, de, fr, …) or auto",
        description="Language of the speech, or auto to detect it for every request",
        runtime=True,
    ),
    SettingSpec(
        name="compute_type",
        kind=str,
        default="float16",
        choices=COMPUTE_TYPES,
        description="Precision; where the device cannot run float16 the server falls back to int8",
        runtime=True,
        reload=True,
    ),
    SettingSpec(
        name="device",
        kind=str,
        default="auto",
        check=_check_device,
        allowed="auto, cpu, cuda or cuda:N",
        description="auto uses an NVIDIA GPU when CTranslate2 sees one",
        runtime=True,
        reload=True,
    ),
    SettingSpec(
        name="beam_size",
        kind=int,
        default=5,
        minimum=1,
        maximum=10,
        description="Beam search width; 1 is greedy and fastest",
        runtime=True,
    ),
    SettingSpec(
        name="vad_threshold",
        kind=float,
        default=0.5,
        minimum=0.0,
        maximum=1.0,
        description="Silero VAD speech probability above which audio counts as speech",
        runtime=True,
    ),
    SettingSpec(
        name="min_speech_duration_ms",
        kind=int,
        default=250,
        minimum=0,
        maximum=10_000,
        description="Speech shorter than this is dropped as noise",
        runtime=True,
    ),
    SettingSpec(
        name="max_speech_duration_s",
        kind=float,
        default=30.0,
        minimum=1.0,
        maximum=3600.0,
        description="Longer speech is split into chunks of at most this length",
        runtime=True,
    ),
    SettingSpec(
        name="speech_pad_ms",
        kind=int,
        default=400,
        minimum=0,
        maximum=5000,
        description="Audio kept before and after each speech chunk",
        runtime=True,
    ),
    SettingSpec(
        name="endpointing",
        kind=bool,
        default=True,
        description="End a command after end_of_speech_s of silence following speech, without waiting for the "
        "client's audio-stop (Home Assistant then needs no VAD of its own)",
        runtime=True,
    ),
    SettingSpec(
        name="end_of_speech_s",
        kind=float,
        default=0.5,
        minimum=0.2,
        maximum=5.0,
        description="Silence after speech that ends a command; shorter pauses inside a sentence never do, and a "
        "pause after which the text stops mid-sentence ('turn on the...') needs 1.5 s",
        runtime=True,
    ),
    SettingSpec(
        name="partial_interval_s",
        kind=float,
        default=1.0,
        minimum=0.0,
        maximum=30.0,
        description="How often the text so far is sent while the speaker talks (transcript-chunk); 0 sends none",
        runtime=True,
    ),
    SettingSpec(
        name="use_names",
        kind=bool,
        default=True,
        description="Give Whisper the names a client sends with a request (Home Assistant: the entities, areas "
        "and floors exposed to Assist) as its prompt, so it spells them as the home does",
        runtime=True,
    ),
    SettingSpec(
        name="encoder_window_s",
        kind=float,
        default=DEFAULT_WINDOW_S,
        minimum=1.0,
        maximum=FULL_WINDOW_S,
        description="Seconds of audio the encoder sees at once; shorter is faster, longer speech is split at "
        "pauses, and a looping decode is redone in the full 30 s window, an unsure one in a window twice as long",
        runtime=True,
    ),
    SettingSpec(
        name="max_queue",
        kind=int,
        default=32,
        minimum=1,
        maximum=10_000,
        description="Requests that may wait for the model; one more is refused at once with server_busy",
        runtime=True,
    ),
    SettingSpec(
        name="max_audio_s",
        kind=float,
        default=60.0,
        minimum=1.0,
        maximum=3600.0,
        description="A request ends with what came once its audio is this long",
        runtime=True,
    ),
    SettingSpec(
        name="log_transcripts",
        kind=bool,
        default=False,
        description="Write transcript text into the request log (off for privacy)",
        runtime=True,
    ),
    SettingSpec(
        name="low_memory_switch",
        kind=bool,
        default=False,
        description="When old and new model do not fit together, unload the old one first "
        "and hold requests while the new one loads",
        runtime=True,
    ),
    SettingSpec(
        name="keep_alive_s",
        kind=float,
        default=0.0,
        minimum=0.0,
        maximum=86_400.0,
        description="Seconds the model stays resident after the last request before it is parked to free its "
        "memory (for other GPU users); the next request brings it back while its audio arrives; 0 keeps it resident",
        runtime=True,
    ),
    SettingSpec(
        name="park_mode",
        kind=str,
        default="host_memory",
        choices=PARK_MODES,
        description="How the model is parked: host_memory moves a GPU model's weights to RAM (quick to bring "
        "back), unload frees RAM too and reads the model from disk again; a CPU model is always unloaded",
        runtime=True,
    ),
    SettingSpec(
        name="cpu_threads",
        kind=int,
        default=0,
        minimum=0,
        maximum=1024,
        description="Threads for CPU inference; 0 uses every core this process may use",
    ),
    SettingSpec(
        name="cpu_threads_per_worker",
        kind=int,
        default=0,
        minimum=0,
        maximum=1024,
        description="CPU threads each worker uses; the CPU threads make that many fewer workers, which transcribe "
        "side by side; 0 gives two workers half the threads each (one thread each below four threads). 1 is "
        "fastest for base and smaller (the decoder gains nothing from more threads). With two workers or more, a "
        "lone request's encoder runs on every CPU thread in a second copy of the weights; as many as CPU_THREADS "
        "(one worker) keeps one copy",
    ),
    SettingSpec(
        name="max_batch",
        kind=int,
        default=8,
        minimum=1,
        maximum=64,
        description="Requests that queued while the model was busy are transcribed together, up to this many",
    ),
    SettingSpec(
        name="memory_limit_mb",
        kind=int,
        default=0,
        minimum=0,
        description="Memory the models may use; 0 detects it (container limit or free GPU memory)",
    ),
    SettingSpec(
        name="model_cache_limit_mb",
        kind=int,
        default=0,
        minimum=0,
        description="Disk space the model cache may use; the least recently used models are removed to make "
        "room, and a model that does not fit is refused; 0 is no limit (free disk space is checked always)",
    ),
    SettingSpec(name="data_dir", kind=str, default="", description="Model cache, settings, server id and token"),
    SettingSpec(name="host", kind=str, default="0.0.0.0", description="Address both ports listen on"),  # noqa: S104
    SettingSpec(name="wyoming_port", kind=int, default=10300, minimum=1, maximum=65535, description="Wyoming TCP port"),
    SettingSpec(
        name="control_port", kind=int, default=10301, minimum=1, maximum=65535, description="HTTP control port"
    ),
    SettingSpec(
        name="zeroconf",
        kind=str,
        default="whisper-gpu",
        choices=ZEROCONF_MODES,
        description="Announce _whisper-gpu._tcp (whisper-gpu), also _wyoming._tcp (wyoming), or nothing (off)",
    ),
    SettingSpec(
        name="max_connections",
        kind=int,
        default=64,
        minimum=1,
        maximum=10_000,
        description="Wyoming connections served at once; one more is answered server_busy and closed",
    ),
    SettingSpec(
        name="idle_timeout_s",
        kind=float,
        default=30.0,
        minimum=1.0,
        maximum=3600.0,
        description="A Wyoming client that sends nothing for this long while it owes the next event (or takes "
        "no event the server sends) gets idle_timeout and is disconnected; waiting for a transcript never counts",
    ),
    SettingSpec(
        name="read_timeout_s",
        kind=float,
        default=10.0,
        minimum=1.0,
        maximum=600.0,
        description="An event whose header has arrived must be complete (data and payload) within this long, "
        "else read_timeout and the connection closes",
    ),
    SettingSpec(
        name="shutdown_grace_s",
        kind=float,
        default=10.0,
        minimum=0.0,
        maximum=600.0,
        description="How long SIGTERM waits for requests in flight",
    ),
    SettingSpec(name="offline", kind=bool, default=False, description="Never contact the model hub"),
    SettingSpec(
        name="allow_model_paths",
        kind=bool,
        default=False,
        description="Let the control API set model to a directory on the server; flags and the environment always may",
    ),
    SettingSpec(name="log_level", kind=str, default="info", choices=LOG_LEVELS, description="Log verbosity"),
    SettingSpec(
        name="control_token", kind=str, default="", secret=True, description="Bearer token for control changes"
    ),
    SettingSpec(name="control_token_file", kind=str, default="", description="File holding the control token"),
    SettingSpec(
        name="control_tls_cert",
        kind=str,
        default="",
        description="PEM certificate (chain) file: the control port then speaks only HTTPS; set with "
        "control_tls_key (a cert-manager Secret gives tls.crt and tls.key)",
    ),
    SettingSpec(
        name="control_tls_key",
        kind=str,
        default="",
        description="PEM private key file of control_tls_cert; both or neither",
    ),
)

RUNTIME_SETTINGS: tuple[str, ...] = tuple(name for name, spec in SETTINGS.items() if spec.runtime)


def validate_change(name: str, value: Any) -> Any:
    """Check one field of a `PATCH`: known, changeable at run time, and valid."""
    spec = SETTINGS.get(name)
    if spec is None:
        raise SettingError(name, ErrorCode.UNKNOWN_FIELD, "no such setting")
    if not spec.runtime:
        raise SettingError(name, ErrorCode.NOT_RUNTIME, "changes only with a restart")
    return spec.validate(value)


def is_locale_list(text: str) -> bool:
    """Whether a value is a gettext locale list (desktop sessions set LANGUAGE so) rather than a Whisper code."""
    try:
        _check_language(text)
    except vol.Invalid:
        return bool(_LOCALE_LIST_PATTERN.match(text))
    return False
