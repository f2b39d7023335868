"""Property-based tests (hypothesis) of what hostile input reaches first: the event reader, the audio conversion
and the settings schema. CI runs a bounded number of examples; `HYPOTHESIS_PROFILE=long` runs many more.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from whisper_gpu.audio import MAX_CHANNELS, MAX_RATE, MIN_RATE, AudioBuffer, AudioFormatError, PcmFormat
from whisper_gpu.engine import SAMPLE_RATE
from whisper_gpu.settings import SETTINGS, SettingError
from whisper_gpu.wyoming_handler import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, ProtocolError, read_event
from wyoming.event import Event

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PROTOCOL_ERROR_CODES = {
    "malformed_event",
    "header_too_large",
    "data_too_large",
    "payload_too_large",
    "read_timeout",
}

# JSON as a hostile client might write it: every type, huge and non-finite numbers, nesting.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
event_types = st.sampled_from(["describe", "transcribe", "audio-start", "audio-chunk", "audio-stop", "ping"]) | st.text(
    max_size=12
)


def read_all(data: bytes) -> tuple[list[Event], ProtocolError | None]:
    """Every event the reader takes from a stream that holds `data` and then ends."""

    async def read() -> tuple[list[Event], ProtocolError | None]:
        reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
        reader.feed_data(data)
        reader.feed_eof()
        events: list[Event] = []
        try:
            while (event := await read_event(reader, read_timeout_s=5)) is not None:
                events.append(event)
        except ProtocolError as err:
            return events, err
        return events, None

    return asyncio.run(read())


def outcome(call: Callable[[], Any]) -> tuple[Any, ValueError | None]:
    """A call's result, or the ValueError it raised (SettingError and AudioFormatError are ValueErrors)."""
    try:
        return call(), None
    except ValueError as err:
        return None, err


def assert_well_formed(events: list[Event], error: ProtocolError | None) -> None:
    for event in events:
        assert isinstance(event.type, str)
        assert isinstance(event.data, dict)
        assert event.payload is None or len(event.payload) <= MAX_PAYLOAD_BYTES
    if error is not None:
        assert error.code in PROTOCOL_ERROR_CODES
        assert error.message


@given(st.binary(max_size=4096))
def test_any_bytes_end_in_events_a_clean_end_or_a_protocol_error(data: bytes) -> None:
    assert_well_formed(*read_all(data))


@given(
    header=st.fixed_dictionaries(
        {},
        optional={
            "type": event_types | json_values,
            "data": json_values | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
            "data_length": st.integers(min_value=-5, max_value=200) | json_values,
            "payload_length": st.integers(min_value=-5, max_value=200) | json_values,
            "version": json_values,
        },
    ),
    rest=st.binary(max_size=300),
)
def test_headers_of_any_shape_are_read_or_refused(header: dict[str, Any], rest: bytes) -> None:
    line = json.dumps(header).encode() + b"\n"
    events, error = read_all(line + rest)
    assert_well_formed(events, error)
    if events:
        first = events[0]
        assert first.type == header["type"]
        payload_length = header.get("payload_length") or 0
        assert len(first.payload or b"") == payload_length


@given(
    depth=st.integers(min_value=1, max_value=60_000),
    where=st.sampled_from(["header", "data", "data_field"]),
    opener=st.sampled_from([b"[", b'{"a":']),
)
def test_deep_nesting_is_read_or_refused(depth: int, where: str, opener: bytes) -> None:
    nested = opener * depth
    if where == "header":
        raw = nested + b"\n"
    elif where == "data_field":
        raw = b'{"type": "transcribe", "data": {"language": ' + nested + b"}}\n"
    else:
        raw = b'{"type": "transcribe", "data_length": %d}\n' % len(nested) + nested
    events, error = read_all(raw[: MAX_HEADER_BYTES * 2])
    assert_well_formed(events, error)


@given(digits=st.integers(min_value=1, max_value=20_000), key=st.sampled_from(["payload_length", "data_length"]))
def test_integers_of_any_length_are_read_or_refused(digits: int, key: str) -> None:
    raw = b'{"type": "audio-chunk", "%s": 1%s}\n' % (key.encode(), b"0" * (digits - 1))
    assert_well_formed(*read_all(raw))


# ---- audio conversion -------------------------------------------------------------------------------------------


@given(rate=json_values, width=json_values, channels=json_values)
def test_a_format_is_valid_or_refused_with_a_reason(rate: Any, width: Any, channels: Any) -> None:
    pcm = PcmFormat.from_event_data({"rate": rate, "width": width, "channels": channels})
    refusal = outcome(pcm.validate)[1]
    if refusal is not None:
        assert isinstance(refusal, AudioFormatError)
        assert str(refusal)
        return
    for value in (pcm.rate, pcm.width, pcm.channels):
        assert type(value) is int
    assert MIN_RATE <= pcm.rate <= MAX_RATE
    assert pcm.width in (1, 2, 4)
    assert 1 <= pcm.channels <= MAX_CHANNELS


formats = st.builds(
    PcmFormat,
    rate=st.sampled_from([1000, 8000, 16000, 22050, 44100, 48000]) | st.integers(MIN_RATE, MAX_RATE),
    width=st.sampled_from([1, 2, 4]),
    channels=st.integers(1, 4),
)


@given(
    pcm=formats,
    max_seconds=st.floats(min_value=0.01, max_value=3.0),
    chunks=st.lists(st.binary(max_size=6000), max_size=8),
)
def test_any_chunks_convert_to_bounded_16khz_audio(pcm: PcmFormat, max_seconds: float, chunks: list[bytes]) -> None:
    buffer = AudioBuffer(pcm, max_seconds)
    frames = 0
    for chunk in chunks:
        buffer.is_heavy(len(chunk))
        if len(chunk) % pcm.frame_bytes:
            with pytest.raises(AudioFormatError, match="whole number"):
                buffer.append(chunk)
            continue
        buffer.append(chunk)
        frames += len(chunk) // pcm.frame_bytes
    audio = buffer.finish()
    kept = min(frames, max(1, int(max_seconds * pcm.rate)))
    assert buffer.truncated == (frames > kept)
    assert buffer.seconds == pytest.approx(kept / pcm.rate)
    assert audio.dtype == np.float32
    assert abs(len(audio) - kept * SAMPLE_RATE / pcm.rate) <= 2
    assert np.all(np.isfinite(audio))
    assert np.all(np.abs(audio) <= 2.0)  # full scale is 1; the resampler may ring a little beyond it


@given(pcm=formats, audio=st.binary(min_size=0, max_size=20_000), cuts=st.lists(st.integers(0, 20_000), max_size=6))
def test_how_a_stream_is_cut_into_chunks_does_not_change_the_audio(
    pcm: PcmFormat, audio: bytes, cuts: list[int]
) -> None:
    audio = audio[: len(audio) - len(audio) % pcm.frame_bytes]
    whole = AudioBuffer(pcm, 60)
    whole.append(audio)
    pieces = AudioBuffer(pcm, 60)
    bounds = sorted({0, len(audio), *(cut - cut % pcm.frame_bytes for cut in cuts if cut <= len(audio))})
    for start, end in itertools.pairwise(bounds):
        pieces.append(audio[start:end])
    expected, got = whole.finish(), pieces.finish()
    assert len(got) == len(expected)
    assert np.allclose(got, expected, atol=1e-4)


def test_a_huge_low_rate_chunk_is_cut_to_the_limit_before_it_is_converted() -> None:
    """4 MiB at 1 kHz is 35 minutes (134 MB at 16 kHz); with a 60 s limit only 60 s are converted."""
    buffer = AudioBuffer(PcmFormat(1000, 2, 1), 60)
    buffer.append(bytes(4 * 1024 * 1024))
    audio = buffer.finish()
    assert buffer.truncated
    assert len(audio) == 60 * SAMPLE_RATE


# ---- settings ---------------------------------------------------------------------------------------------------


# What a token holder might try as a model "directory": other users' homes, names longer than the file system takes.
hostile_paths = st.tuples(
    st.sampled_from(["~", "~nobody", "/", "./", "../", "~/"]),
    st.integers(min_value=0, max_value=6000),
    st.sampled_from(["", "/", "/x"]),
).map(lambda parts: parts[0] + "a" * parts[1] + parts[2])


@pytest.mark.parametrize("name", sorted(SETTINGS))
@given(value=json_values | hostile_paths)
def test_a_setting_value_is_accepted_as_valid_or_refused_with_a_code(name: str, value: Any) -> None:
    spec = SETTINGS[name]
    accepted, refusal = outcome(lambda: spec.validate(value))
    if refusal is not None:
        assert isinstance(refusal, SettingError)
        assert refusal.name == name
        assert refusal.code
        return
    assert type(accepted) is spec.kind
    if spec.kind is float:
        assert math.isfinite(accepted)
    if spec.minimum is not None:
        assert accepted >= spec.minimum
    if spec.maximum is not None:
        assert accepted <= spec.maximum
    if spec.choices:
        assert accepted in spec.choices
    assert spec.validate(accepted) == accepted


@pytest.mark.parametrize("name", sorted(SETTINGS))
@given(text=st.text(max_size=30) | hostile_paths | st.from_regex(r"\A[-+]?\d{0,6000}(\.\d*)?([eE][-+]?\d{1,4})?\Z"))
def test_a_setting_text_parses_to_a_valid_value_or_is_refused(name: str, text: str) -> None:
    spec = SETTINGS[name]
    value, refusal = outcome(lambda: spec.parse(text))
    if refusal is not None:
        assert isinstance(refusal, SettingError)
        assert refusal.name == name
        return
    assert spec.validate(value) == value
