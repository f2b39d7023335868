"""The control API over real HTTP (aiohttp client) against the real server and models."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from helpers.server import TOKEN, ServerProcess, transcribe
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcript

normalize = EnglishTextNormalizer()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def get(http: aiohttp.ClientSession, server: ServerProcess, path: str) -> tuple[int, Any]:
    async with http.get(server.control_url + path) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


async def patch(
    http: aiohttp.ClientSession, server: ServerProcess, body: Any, headers: dict[str, str] | None = AUTH
) -> tuple[int, Any]:
    async with http.patch(server.control_url + "/api/v1/settings", json=body, headers=headers) as response:
        return response.status, await response.json()


async def wait_for_state(
    http: aiohttp.ClientSession, server: ServerProcess, done: Callable[[dict[str, Any]], bool], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = await get(http, server, "/api/v1/status")
        if done(status):
            return status
        await asyncio.sleep(0.1)
    pytest.fail(f"status never reached the expected state: {status}")


def serving(name: str, compute_type: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        model = status["model"] or {}
        return (
            status["state"] == "ready"
            and model.get("name") == name
            and (compute_type is None or model.get("compute_type") == compute_type)
        )

    return check


async def say(server: ServerProcess, utterance: Utterance) -> str:
    audio, rate, width, channels = utterance.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert Transcript.is_type(event.type), event
    return normalize(Transcript.from_event(event).text)


async def test_health_and_readiness_before_and_after_the_model_loads(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession
) -> None:
    server = start_server(model="base", args=["--compute-type", "float32"], wait=False)
    deadline = time.monotonic() + 30
    healthz = 0
    while healthz != 200 and time.monotonic() < deadline:
        try:
            healthz, _ = await get(http, server, "/healthz")
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    assert healthz == 200
    status, body = await get(http, server, "/readyz")
    assert (status, body["status"], body["reason"]) == (503, "not_ready", "loading")
    await wait_for_state(http, server, serving("base", "float32"))
    status, body = await get(http, server, "/readyz")
    assert (status, body) == (200, {"status": "ready", "model": "base", "state": "ready"})


async def test_metrics_count_transcriptions(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8"])
    assert await say(server, kitchen) == normalize(kitchen.text)
    assert await say(server, kitchen) == normalize(kitchen.text)
    status, text = await get(http, server, "/metrics")
    assert status == 200
    assert 'whisper_gpu_requests_total{outcome="ok"} 2.0' in text
    assert "whisper_gpu_request_duration_seconds_count 2.0" in text
    assert "whisper_gpu_real_time_factor_count 2.0" in text
    audio_seconds = float(re.search(r"^whisper_gpu_audio_seconds_total (\S+)$", text, re.MULTILINE).group(1))
    assert audio_seconds == pytest.approx(2 * kitchen.seconds(), abs=0.01)
    assert 'whisper_gpu_model_info{compute_type="int8",device="cpu",model="tiny.en"} 1.0' in text
    assert "whisper_gpu_model_ready 1.0" in text
    assert 'whisper_gpu_model_loads_total{outcome="ok"} 1.0' in text
    assert "whisper_gpu_requests_in_flight 0.0" in text
    assert "# TYPE whisper_gpu_gpu_memory_used_bytes gauge" in text
    assert TOKEN not in text
    _, status_body = await get(http, server, "/api/v1/status")
    assert status_body["requests"]["total"] == 2
    assert status_body["last_request"]["outcome"] == "ok"
    assert status_body["last_request"]["duration_ms"] > 0


async def test_info_describes_device_models_and_settings(
    whisper_server: ServerProcess, http: aiohttp.ClientSession
) -> None:
    status, info = await get(http, whisper_server, "/api/v1/info")
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", info["server_id"])
    assert "data_dir" not in info  # no paths or secrets in public reads
    assert info["device"]["type"] == "cpu"
    assert info["device"]["memory_total_mb"] > 0
    assert "int8" in info["compute_types"]
    assert "float16" not in info["compute_types"]
    models = {model["name"]: model for model in info["models"]}
    assert models["tiny.en"]["loaded"]
    assert models["tiny.en"]["cached"]
    assert models["base"]["offline_package"]
    assert not models["base"]["loaded"]
    assert models["tiny.en"]["english_only"]
    assert not models["base"]["english_only"]
    assert {"large-v3", "large-v3-turbo", "distil-large-v3"} <= set(models)
    # Offline, only what is cached or packaged can be had.
    assert models["base"]["usable"]
    assert not models["small"]["usable"]
    assert info["languages"] == ["auto", "en"]
    schema = info["settings"]
    assert schema["beam_size"] == {
        "type": "integer",
        "default": 5,
        "min": 1,
        "max": 10,
        "reload": False,
        "description": schema["beam_size"]["description"],
    }
    assert schema["model"]["reload"] is True
    assert "float16" in schema["compute_type"]["choices"]
    assert set(schema) >= {
        "model",
        "language",
        "compute_type",
        "device",
        "beam_size",
        "vad_threshold",
        "min_speech_duration_ms",
        "max_speech_duration_s",
        "speech_pad_ms",
    }
    assert not {"wyoming_port", "control_port", "data_dir", "control_token"} & set(schema)


async def test_settings_round_trip_and_apply_to_the_next_request(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--beam-size", "2"])
    status, body = await get(http, server, "/api/v1/settings")
    assert status == 200
    assert body["settings"]["beam_size"] == 2
    assert body["source"]["beam_size"] == "flag"
    assert body["source"]["vad_threshold"] == "default"
    assert body["source"]["model"] == "flag"

    status, body = await patch(http, server, {"beam_size": 1, "vad_threshold": 0.6, "language": "en"})
    assert status == 200
    assert sorted(body["changed"]) == ["beam_size", "vad_threshold"]
    assert body["reload"] is False
    assert body["settings"]["beam_size"] == 1
    _, body = await get(http, server, "/api/v1/settings")
    assert (body["settings"]["beam_size"], body["source"]["beam_size"]) == (1, "api")
    assert (body["settings"]["vad_threshold"], body["source"]["vad_threshold"]) == (0.6, "api")
    assert await say(server, kitchen) == normalize(kitchen.text)

    # A VAD threshold of 1.0 hears no speech at all: the next request proves VAD settings apply at once.
    status, _ = await patch(http, server, {"vad_threshold": 1.0})
    assert status == 200
    assert await say(server, kitchen) == ""

    # Back to the boot value: the source is the flag again, not the API.
    status, body = await patch(http, server, {"beam_size": 2})
    _, body = await get(http, server, "/api/v1/settings")
    assert (body["settings"]["beam_size"], body["source"]["beam_size"]) == (2, "flag")


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"unknown": 1}, {"unknown": "unknown_field"}),
        ({"wyoming_port": 10400}, {"wyoming_port": "not_runtime"}),
        ({"control_token": "x"}, {"control_token": "not_runtime"}),
        ({"beam_size": "3"}, {"beam_size": "invalid_value"}),
        ({"beam_size": 2.5}, {"beam_size": "invalid_value"}),
        ({"beam_size": 11}, {"beam_size": "out_of_range"}),
        ({"vad_threshold": -0.1}, {"vad_threshold": "out_of_range"}),
        ({"log_transcripts": "yes"}, {"log_transcripts": "invalid_value"}),
        ({"compute_type": "int4"}, {"compute_type": "invalid_value"}),
        ({"language": "klingon"}, {"language": "invalid_value"}),
        ({"model": "huge"}, {"model": "unknown_model"}),
        ({"device": "cuda"}, {"device": "not_supported_on_device"}),
        ({"device": "tpu"}, {"device": "invalid_value"}),
        ({"compute_type": "float16"}, {"compute_type": "not_supported_on_device"}),
        ({"language": "de"}, {"language": "not_supported_by_model"}),
        ({"beam_size": 0, "speech_pad_ms": "x"}, {"beam_size": "out_of_range", "speech_pad_ms": "invalid_value"}),
    ],
)
async def test_invalid_changes_are_refused_with_a_code_and_change_nothing(
    whisper_server: ServerProcess, http: aiohttp.ClientSession, body: dict[str, Any], errors: dict[str, str]
) -> None:
    _, before = await get(http, whisper_server, "/api/v1/settings")
    status, answer = await patch(http, whisper_server, body)
    assert (status, answer) == (400, {"errors": errors})
    _, after = await get(http, whisper_server, "/api/v1/settings")
    assert after == before


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', b""])
async def test_a_body_that_is_not_a_json_object_is_refused(
    whisper_server: ServerProcess, http: aiohttp.ClientSession, raw: bytes
) -> None:
    async with http.patch(whisper_server.control_url + "/api/v1/settings", data=raw, headers=AUTH) as response:
        assert response.status == 400
        assert await response.json() == {"errors": {"base": "invalid_json"}}


async def test_an_oversized_body_is_refused(whisper_server: ServerProcess, http: aiohttp.ClientSession) -> None:
    body = b'{"beam_size": 3, "pad": "' + b"x" * 70_000 + b'"}'
    async with http.patch(whisper_server.control_url + "/api/v1/settings", data=body, headers=AUTH) as response:
        assert response.status == 413
        assert await response.json() == {"error": "body_too_large"}


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
async def test_changes_need_the_token(
    whisper_server: ServerProcess, http: aiohttp.ClientSession, headers: dict[str, str] | None
) -> None:
    _, before = await get(http, whisper_server, "/api/v1/settings")
    status, body = await patch(http, whisper_server, {"beam_size": 1}, headers=headers)
    assert (status, body) == (401, {"error": "unauthorized"})
    _, after = await get(http, whisper_server, "/api/v1/settings")
    assert after == before
    async with http.get(whisper_server.control_url + "/api/v1/auth", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(whisper_server.control_url + "/api/v1/auth", headers=AUTH) as response:
        assert response.status == 204
    assert TOKEN not in whisper_server.log()


async def test_unknown_paths_and_methods_answer_json(
    whisper_server: ServerProcess, http: aiohttp.ClientSession
) -> None:
    status, body = await get(http, whisper_server, "/api/v1/nothing")
    assert (status, body) == (404, {"error": "not_found"})
    async with http.post(whisper_server.control_url + "/api/v1/settings", headers=AUTH) as response:
        assert response.status == 405
        assert await response.json() == {"error": "method_not_allowed"}


async def keep_talking(server: ServerProcess, utterance: Utterance, stop: asyncio.Event) -> list[str]:
    """Transcribe back to back until stopped; every answer is kept (a lost request fails the caller)."""
    heard = []
    while not stop.is_set():
        heard.append(await say(server, utterance))
    heard.append(await say(server, utterance))
    return heard


@pytest.mark.parametrize(
    ("boot", "change", "after"),
    [
        (("base", "float32"), {"model": "tiny.en", "compute_type": "int8"}, ("tiny.en", "int8")),
        (("base", "float32"), {"compute_type": "int8"}, ("base", "int8")),
    ],
    ids=["base-to-tiny.en", "float32-to-int8"],
)
async def test_hot_switch_while_transcribing_loses_no_request(
    start_server: Callable[..., ServerProcess],
    http: aiohttp.ClientSession,
    kitchen: Utterance,
    boot: tuple[str, str],
    change: dict[str, str],
    after: tuple[str, str],
) -> None:
    server = start_server(model=boot[0], args=["--compute-type", boot[1]])
    stop = asyncio.Event()
    talking = asyncio.create_task(keep_talking(server, kitchen, stop))
    await asyncio.sleep(0.5)  # a request is in flight now
    status, body = await patch(http, server, change)
    assert status == 200
    assert body["reload"] is True
    status, conflict = await patch(http, server, {"beam_size": 3})
    assert (status, conflict) == (409, {"error": "reload_in_progress"})
    # While the new model loads, the old one (the boot model with the boot compute type) keeps serving.
    during = await wait_for_state(http, server, lambda status: status["target"] is not None, timeout=30)
    assert (during["model"]["name"], during["model"]["compute_type"]) == boot
    assert (during["target"]["name"], during["target"]["compute_type"]) == after
    await wait_for_state(http, server, serving(*after))
    await asyncio.sleep(0.5)
    stop.set()
    heard = await talking
    assert len(heard) >= 2
    assert heard == [normalize(kitchen.text)] * len(heard)
    served_by = re.findall(r"outcome ok", server.log())
    assert len(served_by) == len(heard)
    assert f"model {boot[0]}, outcome ok" in server.log()
    assert f"model {after[0]}, outcome ok" in server.log()
    assert "Unloaded" in server.log()
    _, settings = await get(http, server, "/api/v1/settings")
    assert settings["settings"]["compute_type"] == after[1]


def load_ended(status: dict[str, Any]) -> bool:
    return status["target"] is None and status["state"] not in ("loading", "downloading")


async def test_a_failed_switch_keeps_the_old_model_serving_and_says_so(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    """The state says what serves (ready, on the old model); the failure is reported beside it until a load works."""
    server = start_server(args=["--compute-type", "int8"])
    status, body = await patch(http, server, {"model": "nobody/no-such-model"})
    assert (status, body["reload"]) == (200, True)
    # The load shows at once, or has failed already (offline, that takes milliseconds): a client polling right
    # after the change never mistakes it for done.
    _, during = await get(http, server, "/api/v1/status")
    shown = during["target"]["name"] if during["target"] else during["last_failure"]["model"]
    assert shown == "nobody/no-such-model"
    after = await wait_for_state(http, server, load_ended)
    assert (after["state"], after["model"]["name"], after["error"]) == ("ready", "tiny.en", None)
    failure = after["last_failure"]
    assert (failure["code"], failure["model"], failure["compute_type"]) == (
        "not_available_offline",
        "nobody/no-such-model",
        "int8",
    )
    assert "offline mode forbids downloading it" in failure["message"]
    assert failure["time"].endswith("+00:00")
    assert (await get(http, server, "/readyz"))[0] == 200
    assert await say(server, kitchen) == normalize(kitchen.text)
    _, settings = await get(http, server, "/api/v1/settings")
    assert settings["settings"]["model"] == "tiny.en"
    assert 'whisper_gpu_model_loads_total{outcome="failed"} 1.0' in (await get(http, server, "/metrics"))[1]

    # Choosing the serving model again loads nothing and keeps the report; the next load that works clears it.
    status, body = await patch(http, server, {"model": "tiny.en"})
    assert (status, body["reload"]) == (200, False)
    status, body = await patch(http, server, {"compute_type": "float32"})
    assert (status, body["reload"]) == (200, True)
    switched = await wait_for_state(http, server, serving("tiny.en", "float32"))
    assert (switched["error"], switched["last_failure"]) == (None, None)


async def test_the_memory_estimate_counts_the_second_copy_of_the_weights(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession
) -> None:
    """Two CPU workers load a model twice (a lone request's encoder runs on every thread): with 250 MB, base int8
    fits once (about 205 MB) but not twice (about 290 MB), so only the one-worker server offers it."""
    usable = {}
    for workers, per_worker in ((1, "2"), (2, "1")):
        server = start_server(args=["--cpu-threads", "2", "--cpu-threads-per-worker", per_worker,
                                    "--memory-limit-mb", "250"])  # fmt: skip
        _, info = await get(http, server, "/api/v1/info")
        usable[workers] = {model["name"]: model["usable"] for model in info["models"]}
        server.stop()
    assert usable[1]["base"]
    assert not usable[2]["base"]
    assert usable[2]["tiny.en"]


async def test_memory_check_refuses_a_switch_that_would_not_fit(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    # 300 MB: base int8 (about 205 MB, 290 MB with a second copy of the weights on two CPU workers) serves; tiny.en
    # (about 165 MB, 210 MB) does not fit beside it.
    server = start_server(model="base", args=["--compute-type", "int8", "--memory-limit-mb", "300"])
    _, info = await get(http, server, "/api/v1/info")
    usable = {model["name"]: model["usable"] for model in info["models"]}
    assert usable["tiny.en"]
    assert usable["base"]
    assert not usable["large-v3"]
    status, body = await patch(http, server, {"model": "tiny.en"})
    assert (status, body) == (400, {"errors": {"model": "insufficient_memory"}})
    assert (await get(http, server, "/api/v1/status"))[1]["model"]["name"] == "base"

    # With low_memory_switch the old model is unloaded first and requests wait for the new one.
    status, body = await patch(http, server, {"low_memory_switch": True})
    assert status == 200
    status, body = await patch(http, server, {"model": "tiny.en"})
    assert (status, body["reload"]) == (200, True)
    assert await say(server, kitchen) == normalize(kitchen.text)
    await wait_for_state(http, server, serving("tiny.en", "int8"))
    assert "Unloading base before loading tiny.en" in server.log()


async def test_changes_persist_across_restarts_unless_the_boot_value_changed(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    data_dir = tmp_path / "persist"
    first = start_server(data_dir=data_dir, args=["--compute-type", "int8", "--beam-size", "2"])
    status, _ = await patch(http, first, {"beam_size": 4, "vad_threshold": 0.3, "model": "base"})
    assert status == 200
    await wait_for_state(http, first, serving("base"))
    assert first.stop() == 0

    # Same boot values: the API's changes come back.
    second = start_server(data_dir=data_dir, args=["--compute-type", "int8", "--beam-size", "2"])
    _, body = await get(http, second, "/api/v1/settings")
    assert body["settings"]["beam_size"] == 4
    assert body["settings"]["vad_threshold"] == 0.3
    assert body["settings"]["model"] == "base"
    assert body["source"]["beam_size"] == body["source"]["vad_threshold"] == body["source"]["model"] == "api"
    assert (await get(http, second, "/api/v1/status"))[1]["model"]["name"] == "base"
    assert second.stop() == 0

    # The operator changed BEAM_SIZE since: the boot value wins, the other changes stay.
    third = start_server(data_dir=data_dir, model="tiny.en", args=["--compute-type", "int8"], env={"BEAM_SIZE": "3"})
    _, body = await get(http, third, "/api/v1/settings")
    assert (body["settings"]["beam_size"], body["source"]["beam_size"]) == (3, "env")
    assert (body["settings"]["vad_threshold"], body["source"]["vad_threshold"]) == (0.3, "api")
    assert body["settings"]["model"] == "base"  # MODEL's boot value (the flag) did not change
    assert "Dropping stored beam_size=4" in third.log()


async def test_a_failed_switch_takes_back_the_whole_change(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8"])
    _, before = await get(http, server, "/api/v1/settings")
    status, body = await patch(http, server, {"model": "nobody/x", "language": "de", "beam_size": 2})
    assert (status, body["reload"]) == (200, True)
    failed = await wait_for_state(http, server, load_ended)
    assert (failed["state"], failed["last_failure"]["code"]) == ("ready", "not_available_offline")
    _, after = await get(http, server, "/api/v1/settings")
    assert after == before  # model, language and beam size: none of the change stays
    stored = server.data_dir / "settings.json"
    assert not stored.exists() or json.loads(stored.read_text())["overrides"] == {}
    assert await say(server, kitchen) == normalize(kitchen.text)
    status, body = await patch(http, server, {"beam_size": 3})
    assert (status, body["changed"]) == (200, ["beam_size"])


def raw_patch(http: aiohttp.ClientSession, server: ServerProcess, raw: bytes, query: str = "") -> Any:
    return http.patch(server.control_url + "/api/v1/settings" + query, data=raw, headers=AUTH)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"beam_size": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"beam_size": ' + b"9" * 5000 + b"}",
        b'{"vad_threshold": NaN}',
        b'{"vad_threshold": Infinity}',
        b'{"vad_threshold": -Infinity}',
    ],
    ids=["nested-array", "nested-value", "5000-digits", "nan", "infinity", "minus-infinity"],
)
async def test_hostile_json_is_refused_with_a_code_and_no_traceback(
    whisper_server: ServerProcess, http: aiohttp.ClientSession, raw: bytes
) -> None:
    _, before = await get(http, whisper_server, "/api/v1/settings")
    async with raw_patch(http, whisper_server, raw) as response:
        assert response.status == 400
        assert await response.json() == {"errors": {"base": "invalid_json"}}
    assert (await get(http, whisper_server, "/api/v1/settings"))[1] == before
    assert "Traceback" not in whisper_server.log()
    assert (await get(http, whisper_server, "/healthz"))[0] == 200


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"beam_size": True}, {"beam_size": "invalid_value"}),
        ({"vad_threshold": True}, {"vad_threshold": "invalid_value"}),
        ({"max_audio_s": False}, {"max_audio_s": "invalid_value"}),
        ({"log_transcripts": 1}, {"log_transcripts": "invalid_value"}),
        ({"beam_size": None}, {"beam_size": "invalid_value"}),
        ({"beam_size": 3, "surprise": 1}, {"surprise": "unknown_field"}),
        ({"model": "a/.."}, {"model": "unknown_model"}),
        ({"model": "/etc"}, {"model": "path_not_allowed"}),
        ({"model": "/no/such/directory"}, {"model": "path_not_allowed"}),
        ({"model": "~/models"}, {"model": "path_not_allowed"}),
        ({"model": "../../"}, {"model": "path_not_allowed"}),
        ({"compute_type": "int16"}, {"compute_type": "invalid_value"}),
    ],
)
async def test_values_of_the_wrong_kind_are_refused_and_change_nothing(
    whisper_server: ServerProcess, http: aiohttp.ClientSession, body: dict[str, Any], errors: dict[str, str]
) -> None:
    _, before = await get(http, whisper_server, "/api/v1/settings")
    assert await patch(http, whisper_server, body) == (400, {"errors": errors})
    assert (await get(http, whisper_server, "/api/v1/settings"))[1] == before


@pytest.mark.parametrize("query", ["?token=", "?access_token=", "?authorization=Bearer%20"])
async def test_a_token_in_the_query_string_is_not_accepted(
    whisper_server: ServerProcess, http: aiohttp.ClientSession, query: str
) -> None:
    _, before = await get(http, whisper_server, "/api/v1/settings")
    async with http.patch(
        whisper_server.control_url + "/api/v1/settings" + query + TOKEN, json={"beam_size": 1}
    ) as response:
        assert (response.status, await response.json()) == (401, {"error": "unauthorized"})
    async with http.get(whisper_server.control_url + "/api/v1/auth" + query + TOKEN) as response:
        assert response.status == 401
    assert (await get(http, whisper_server, "/api/v1/settings"))[1] == before
    assert TOKEN not in whisper_server.log()


async def test_concurrent_changes_all_land_and_agree_with_the_file(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession
) -> None:
    server = start_server(args=["--compute-type", "int8"])
    answers = await asyncio.gather(*(patch(http, server, {"beam_size": size}) for size in range(1, 11)))
    assert [status for status, _ in answers] == [200] * 10
    _, body = await get(http, server, "/api/v1/settings")
    stored = json.loads((server.data_dir / "settings.json").read_text())["overrides"]
    assert stored["beam_size"]["value"] == body["settings"]["beam_size"]
    assert body["settings"]["beam_size"] in range(1, 11)


async def test_concurrent_reloads_start_one_and_refuse_the_rest(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8"])
    answers = await asyncio.gather(
        *(patch(http, server, {"compute_type": "float32", "beam_size": size}) for size in range(1, 7))
    )
    accepted = [body for status, body in answers if status == 200]
    assert len(accepted) == 1
    assert sorted(status for status, _ in answers) == [200] + [409] * 5
    assert all(body == {"error": "reload_in_progress"} for status, body in answers if status == 409)
    await wait_for_state(http, server, serving("tiny.en", "float32"))
    _, body = await get(http, server, "/api/v1/settings")
    assert body["settings"]["beam_size"] == accepted[0]["settings"]["beam_size"]
    assert await say(server, kitchen) == normalize(kitchen.text)
    assert TOKEN not in server.log()


async def test_model_paths_through_the_api_only_when_the_operator_allows_them(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance, tmp_path: Any
) -> None:
    server = start_server(args=["--compute-type", "int8", "--allow-model-paths"])
    directory = server.data_dir / ".cache" / "models" / "tiny.en"
    assert await patch(http, server, {"model": str(tmp_path)}) == (400, {"errors": {"model": "unknown_model"}})
    status, body = await patch(http, server, {"model": str(directory)})
    assert (status, body["reload"]) == (200, True)
    await wait_for_state(http, server, serving(str(directory), "int8"))
    assert await say(server, kitchen) == normalize(kitchen.text)
    assert server.stop() == 0

    # Allowed no more: the stored directory is dropped at the next start, and the boot model serves.
    again = start_server(data_dir=server.data_dir, args=["--compute-type", "int8"])
    _, body = await get(http, again, "/api/v1/settings")
    assert (body["settings"]["model"], body["source"]["model"]) == ("tiny.en", "flag")
    assert f"Dropping stored model {directory}: a directory, and ALLOW_MODEL_PATHS is off" in again.log()


async def test_offered_compute_types_are_exactly_those_accepted(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession
) -> None:
    """Every type `/api/v1/info` offers loads; a raw CTranslate2 type outside the schema is not offered."""
    import ctranslate2  # noqa: PLC0415

    server = start_server(args=["--compute-type", "int8"])
    _, info = await get(http, server, "/api/v1/info")
    offered = info["compute_types"]
    runnable = set(ctranslate2.get_supported_compute_types("cpu"))
    assert offered[0] == "auto"
    assert set(offered[1:]) == runnable & set(info["settings"]["compute_type"]["choices"])
    for compute_type in [*offered[1:], "auto"]:
        status, body = await patch(http, server, {"compute_type": compute_type})
        assert status == 200, (compute_type, body)
        if body["reload"]:
            await wait_for_state(http, server, lambda status: status["state"] == "ready" and not status["target"])
    for refused in sorted(set(info["settings"]["compute_type"]["choices"]) - set(offered)):
        status, body = await patch(http, server, {"compute_type": refused})
        assert (status, body) == (400, {"errors": {"compute_type": "not_supported_on_device"}})


def test_raw_ctranslate2_types_outside_the_schema_are_not_offered() -> None:
    """CTranslate2 reports int16 on some CPUs (not this one, perhaps): the schema has no int16, so it is left out."""
    from whisper_gpu.service import accepted_compute_types  # noqa: PLC0415

    assert accepted_compute_types({"int16", "int8", "float32", "int8_float32"}) == [
        "auto",
        "int8_float32",
        "int8",
        "float32",
    ]
    assert accepted_compute_types({"float16", "int8_float16", "int16"})[:3] == ["auto", "float16", "int8_float16"]
