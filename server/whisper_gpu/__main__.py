"""Command line: parse settings, wire the parts, run one subcommand."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .boot_settings import ResolvedSettings, add_setting_flags, resolve_settings
from .settings import SETTINGS, SettingError

_LOGGER = logging.getLogger("whisper_gpu")
COMMANDS = ("serve", "transcribe", "models", "health", "token")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `whisper-gpu` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (arguments[0] not in COMMANDS and arguments[0] not in ("-h", "--help", "--version")):
        arguments.insert(0, "serve")
    args = _parser().parse_args(arguments)
    flags = {name: getattr(args, name) for name in SETTINGS}
    try:
        settings = resolve_settings(flags, os.environ)
    except SettingError as err:
        spec = SETTINGS[err.name]
        print(f"whisper-gpu: invalid setting {spec.env} ({spec.flag}): {err.message}", file=sys.stderr)  # noqa: T201
        return 2
    _configure_logging(settings["log_level"])
    for note in settings.notes:
        _LOGGER.info("%s", note)
    return int(args.run(args, settings))


def _parser() -> argparse.ArgumentParser:
    settings_parent = argparse.ArgumentParser(add_help=False)
    add_setting_flags(settings_parent)
    parser = argparse.ArgumentParser(
        prog="whisper-gpu", description="Wyoming speech-to-text server on faster-whisper (GPU or CPU)"
    )
    parser.add_argument("--version", action="version", version=f"whisper-gpu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[settings_parent], help="run the server (default)")
    serve.set_defaults(run=_serve)

    transcribe = commands.add_parser(
        "transcribe", parents=[settings_parent], help="print the text of WAV/FLAC/MP3 files"
    )
    transcribe.add_argument("files", nargs="+", type=Path, metavar="FILE")
    transcribe.set_defaults(run=_transcribe)

    models = commands.add_parser("models", help="list, download or remove models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", parents=[settings_parent], help="known, cached and loaded models")
    listing.set_defaults(run=_models_list)
    download = model_commands.add_parser("download", parents=[settings_parent], help="fetch a model into the cache")
    download.add_argument("name")
    download.set_defaults(run=_models_download)
    remove = model_commands.add_parser("remove", parents=[settings_parent], help="delete a model from the cache")
    remove.add_argument("name")
    remove.set_defaults(run=_models_remove)

    health = commands.add_parser(
        "health", parents=[settings_parent], help="exit 0 when the server answers describe and is ready"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    health.set_defaults(run=_health)

    token = commands.add_parser("token", parents=[settings_parent], help="print the control token")
    token.set_defaults(run=_token)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if level != "debug":
        # faster-whisper logs every request's duration at INFO; our own request line says more.
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _serve(_args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from .identity import TokenError  # noqa: PLC0415
    from .server import serve  # noqa: PLC0415 - keeps `token` and `health` quick to start

    try:
        return asyncio.run(serve(settings))
    except TokenError as err:
        _LOGGER.error("Cannot start: %s", err)  # noqa: TRY400 - a settings problem, not a crash
        return 2
    except KeyboardInterrupt:
        return 0


def _transcribe(args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from faster_whisper import decode_audio  # noqa: PLC0415

    from .engine import DecodeOptions, WhisperEngine, resolve_compute_type, resolve_device  # noqa: PLC0415
    from .hardware import cpu_threads  # noqa: PLC0415
    from .models import ModelCache, ModelError  # noqa: PLC0415

    cache = ModelCache(Path(settings["data_dir"]), limit_mb=settings["model_cache_limit_mb"])
    try:
        device = resolve_device(settings["device"])
        compute_type, note = resolve_compute_type(settings["compute_type"], device)
        path = cache.ensure(settings["model"], offline=settings["offline"])
    except (ModelError, ValueError) as err:
        _LOGGER.error("%s", err)  # noqa: TRY400
        return 1
    if note:
        _LOGGER.warning("%s", note)
    engine = WhisperEngine(
        name=settings["model"],
        path=path,
        device=device,
        compute_type=compute_type,
        cpu_threads=cpu_threads(settings.values),
    )
    language = None if settings["language"] == "auto" else settings["language"]
    options = DecodeOptions.from_settings(settings.values, language)
    failed = 0
    for file in args.files:
        try:
            audio = decode_audio(str(file), sampling_rate=16_000)
        except Exception as err:  # noqa: BLE001 - PyAV raises many kinds; report and go on
            print(f"{file}: cannot decode: {err}", file=sys.stderr)  # noqa: T201
            failed += 1
            continue
        text = engine.transcribe(audio, options).text
        print(f"{file}: {text}" if len(args.files) > 1 else text)  # noqa: T201
    return 1 if failed else 0


def _models_list(_args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from .models import KNOWN_MODELS, ModelCache  # noqa: PLC0415

    cache = ModelCache(Path(settings["data_dir"]))
    cached = set(cache.cached_names())
    status = _get_json(settings, "/api/v1/status", timeout=1.0)
    loaded = (status.get("model") or {}).get("name") if isinstance(status, dict) else None
    print(f"{'MODEL':<20} {'CACHED':<7} {'OFFLINE PACKAGE':<16} LOADED")  # noqa: T201
    for name in [*KNOWN_MODELS, *sorted(cached - set(KNOWN_MODELS))]:
        known = KNOWN_MODELS.get(name)
        package = "installed" if known and known.offline and known.offline.installed() else "-"
        if known and known.offline and not known.offline.installed():
            package = f"[{known.offline.extra}]"
        print(  # noqa: T201
            f"{name:<20} {'yes' if name in cached else 'no':<7} {package:<16} {'yes' if name == loaded else ''}"
        )
    if status is None:
        print("(no server answered on the control port: LOADED is unknown)", file=sys.stderr)  # noqa: T201
    return 0


def _models_download(args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from .models import ModelCache, ModelError  # noqa: PLC0415

    try:
        cache = ModelCache(Path(settings["data_dir"]), limit_mb=settings["model_cache_limit_mb"])
        path = cache.ensure(args.name, offline=settings["offline"])
    except ModelError as err:
        _LOGGER.error("%s", err.message)  # noqa: TRY400
        return 1
    print(path)  # noqa: T201
    return 0


def _models_remove(args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from .models import ModelCache  # noqa: PLC0415

    if not ModelCache(Path(settings["data_dir"])).remove(args.name):
        _LOGGER.error("%s is not in the cache", args.name)
        return 1
    print(f"removed {args.name}")  # noqa: T201
    return 0


def _health(args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from wyoming.client import AsyncTcpClient  # noqa: PLC0415
    from wyoming.info import Describe, Info  # noqa: PLC0415

    async def describe() -> bool:
        async with AsyncTcpClient(_local_host(settings), settings["wyoming_port"]) as client:
            await client.write_event(Describe().event())
            while (event := await client.read_event()) is not None:
                if Info.is_type(event.type):
                    return bool(Info.from_event(event).asr)
        return False

    try:
        described = asyncio.run(asyncio.wait_for(describe(), args.timeout))
    except (OSError, TimeoutError) as err:
        print(f"unhealthy: Wyoming port {settings['wyoming_port']}: {err or 'timed out'}", file=sys.stderr)  # noqa: T201
        return 1
    ready = _get_json(settings, "/readyz", timeout=args.timeout)
    if not described or not isinstance(ready, dict) or ready.get("status") != "ready":
        print(f"unhealthy: describe={'ok' if described else 'no asr'}, ready={ready}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"healthy: model {ready.get('model')}")  # noqa: T201
    return 0


def _token(_args: argparse.Namespace, settings: ResolvedSettings) -> int:
    from .identity import TOKEN_FILE, TokenError, load_or_create_token  # noqa: PLC0415

    data_dir = Path(settings["data_dir"])
    if not (settings["control_token"] or settings["control_token_file"] or (data_dir / TOKEN_FILE).is_file()):
        print(f"No control token yet in {data_dir}: start the server once to generate it", file=sys.stderr)  # noqa: T201
        return 1
    try:
        print(load_or_create_token(settings, data_dir))  # noqa: T201
    except TokenError as err:
        print(err, file=sys.stderr)  # noqa: T201
        return 1
    return 0


def _local_host(settings: ResolvedSettings) -> str:
    host = str(settings["host"])
    return "127.0.0.1" if host in ("", "0.0.0.0") else host  # noqa: S104 - comparing, not binding


def _get_json(settings: ResolvedSettings, path: str, timeout: float) -> object | None:
    """GET a control-port path; the JSON body (also of 503 answers), or None when nothing answers.

    With CONTROL_TLS_CERT set, over HTTPS trusting exactly that certificate (tls.local_client_context).
    """
    from .tls import control_tls_enabled, local_client_context  # noqa: PLC0415

    tls = control_tls_enabled(settings.values)
    url = f"{'https' if tls else 'http'}://{_local_host(settings)}:{settings['control_port']}{path}"
    try:
        context = local_client_context(settings.values) if tls else None
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 - our own URL
            return _json_body(response.read())
    except urllib.error.HTTPError as err:
        return _json_body(err.read())
    except OSError:
        return None


def _json_body(raw: bytes) -> object | None:
    try:
        body: object = json.loads(raw)
    except ValueError:
        return None
    return body


if __name__ == "__main__":
    sys.exit(main())
