"""The speech model behind a narrow interface: 16 kHz mono float audio in, text out, several requests at once.

Nothing here knows about Wyoming or HTTP. Calls block; the inference queue runs them on its own thread.

Whisper pads every input to 30 s, and on a CPU the encoder's time grows with that window, not with the speech. The
engine encodes the speech in a shorter window (`encoder_window_s`; longer speech is split at pauses into pieces that fit
it), caps the tokens it may generate by the speech's duration, and decodes the pieces of a batch in as few CTranslate2
calls as there are workers (on a CPU, one-thread workers side by side: see CpuThreads). The features of a fitted window
end in zeros, as faster-whisper pads its 30 s window; padding the audio with silence instead cost a third more word
errors on the benchmark's commands. A short window can make the decoder repeat itself: a piece whose text loops (the
token cap reached, a phrase repeated, or text that compresses like Whisper's repetitions do) is decoded again the way
faster-whisper does it, in the full 30 s window; one whose decode is unsure is checked in a window twice as long, which
on the benchmark's commands brought its error rate below the full window's at a third of the full window's cost. With
`LANGUAGE=auto` the language is detected from the encoder output already computed.

Names a request brings (of the speaker's home) become the decoder's prompt, the text before the speech, where the
decode without them was unsure: a sure decode stands as it is, since a list of names before clear speech changed more
ordinary words than names. The transcript's near-misses of the names are spelled as the names (names.py). A decode
that merely repeats the prompt's names is done again without them: given names, unclear speech tends to come out as
a list of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_ctranslate2_storage, get_suppressed_tokens
from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps
from threadpoolctl import threadpool_limits

from .names import NameSpeller, PromptEcho

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
FULL_WINDOW_S = 30.0
# The encoder_window_s setting's default. 8 s took 11% less time per command on the benchmark's 60 commands at the
# same word error rate, but on a fresh machine a clear test command came back wrong ("what's the winner like today").
DEFAULT_WINDOW_S = 10.0
STAGES = ("vad", "features", "encoder", "decoder", "fallback")
_FRAMES_PER_SECOND = 100  # the feature extractor's hop is 160 samples
_MAX_TOKENS = 448  # Whisper's decoder positions, prompt included
# Generous for any language's speaking rate; only a decoder stuck in a loop gets near it.
_TOKENS_PER_SECOND = 10
_TOKEN_MARGIN = 16
_COMPRESSION_RATIO_LIMIT = 2.4  # Whisper's own threshold for repetitive text
_REPEATS = 2  # a phrase said this many times in a row, and
_REPEATED_WORDS = 6  # covering at least this many words, is a loop rather than speech
_WORDS = re.compile(r"[\w']+")
# A phrase of this many words followed by one this alike (difflib's ratio over words) is a loop too.
_NEAR_REPEAT_WORDS = (4, 12)
_NEAR_REPEAT_SIMILARITY = 0.85
_PIECES_PER_CALL = 16  # bounds the memory of one encoder call
# A fitted window's decode less sure than this (mean log-probability per token) is checked in a wider window.
_UNSURE_LOGPROB = -0.5
_UNSURE_WIDENING = 2
# A request's names are tried (in the same window) where its decode without them is less sure than this. On the test
# set of bench/run --names (base, same audio): at -0.5 commands with names had 0.52x of their error rate without
# names; at -0.4 0.47x, ordinary commands 0.91x, their median time the same, their mean +10%; -0.3 gave 0.39x but
# decoded half of the ordinary commands twice (+60% median time).
_UNSURE_WITHOUT_NAMES_LOGPROB = -0.4
_SHORTENED_SILENCE_MS = 1000  # Silero's default, 2000, left pauses in which the decoder stopped
# Audio in which Silero finds no speech is searched again at this fraction of VAD_THRESHOLD (not above its default):
# it scores whispers at 0.3-0.7 for a few frames only. What that search finds stands only where Whisper agrees.
_QUIET_SPEECH_THRESHOLD = 0.5
_QUIET_SPEECH_UP_TO = 0.5
# Whisper's own limits (faster-whisper's no_speech_threshold and log_prob_threshold): a piece that Whisper thinks
# likelier silence than speech and whose words it is this unsure of is noise (loud hiss came back as "you."); a
# quiet piece is noise on either count. Recorded whispers decoded at 0.01-0.18 and -0.1 to -0.3; pink noise that
# passed the lower threshold at 0.65-0.81 and -1.4 to -2.4.
_NO_SPEECH_PROB = 0.6
_NOISE_LOGPROB = -1.0
_FULL_FRAMES = round(FULL_WINDOW_S * _FRAMES_PER_SECOND)
_HALF_PRECISION = ("float16", "bfloat16", "int8_float16", "int8_bfloat16")
# CTranslate2 skips an unload while its worker threads still hold the model (just after a call returned); it is
# tried again this often, this long.
_UNLOAD_RETRY_S = 0.01
_UNLOAD_PATIENCE_S = 5.0
# Tokens of names given to the decoder as the text before the speech (Whisper allows up to 223). The prompt's cost
# grows with its length: on a CPU, base's decode (beam 5) took about 110 ms without names, 125 ms with 64 tokens and
# 160 ms with 128; 64 halved the word error rate of commands with names (bench/run --names).
NAME_PROMPT_TOKENS = 64
_CLOSEST_NAMES = 4  # names like what the first decode heard, put first in the redo's prompt
_NAME_PLANS_KEPT = 64  # lists of names whose speller and echo check are kept (one per home, as a rule)


ResultCallback = Callable[[int, "TranscriptResult"], None]


@dataclass(frozen=True)
class CpuThreads:
    """A CPU model's threads: `total`, shared out as workers of `per_worker` threads that decode side by side.

    Whisper's decoder multiplies a few vectors at a time, too little work to share among threads. Measured on 2 cores
    (base, int8, beam 5, a command in the 10 s window): one thread encoded in 74 ms and decoded in 73 ms; two threads
    on one call took 55 ms and 159 ms. Two one-thread workers did 8 commands in 544 ms against 822 ms.

    With more threads the default keeps two workers of half the threads each, so that a large model's encoder still
    has several threads for a lone request (that machine had no more cores to measure it on). A batch that is one
    request encodes on all `total` threads, in a copy of the weights loaded for that (base: about 110 MB more).
    """

    total: int
    per_worker: int = 0
    """0: half the threads each (one each with fewer than four)."""

    @property
    def threads_per_worker(self) -> int:
        """Threads each worker runs on."""
        return min(self.per_worker or max(1, self.total // 2), self.total)

    @property
    def workers(self) -> int:
        """How many calls run side by side (a remainder too small for a worker goes unused)."""
        return max(1, self.total // self.threads_per_worker)


class UnsupportedOnDeviceError(ValueError):
    """A device or compute type this machine cannot run."""


@dataclass(frozen=True)
class Device:
    """Where inference runs."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class DecodeOptions:
    """Per-request decoding choices."""

    language: str | None
    beam_size: int
    vad_threshold: float
    min_speech_duration_ms: int
    max_speech_duration_s: float
    speech_pad_ms: int
    window_s: float = FULL_WINDOW_S
    names: tuple[str, ...] = ()
    """Names the speaker may say, most likely first: the start of the list becomes Whisper's prompt."""

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], language: str | None, names: tuple[str, ...] = ()
    ) -> DecodeOptions:
        """Beam size, VAD values and the encoder window from the settings; the language and names of the request."""
        return cls(
            language=language,
            beam_size=settings["beam_size"],
            vad_threshold=settings["vad_threshold"],
            min_speech_duration_ms=settings["min_speech_duration_ms"],
            max_speech_duration_s=settings["max_speech_duration_s"],
            speech_pad_ms=settings["speech_pad_ms"],
            window_s=settings["encoder_window_s"],
            names=names,
        )


@dataclass(frozen=True)
class TranscriptResult:
    """What the model heard, and where the time went (seconds by stage, see STAGES; `queue` added by the queue)."""

    text: str
    language: str
    audio_seconds: float
    speech_seconds: float
    stages: Mapping[str, float] = field(default_factory=dict)
    fallbacks: int = 0


@dataclass
class _Request:
    """One request's pieces and bookkeeping while a batch runs."""

    audio_seconds: float
    options: DecodeOptions
    stages: dict[str, float]
    pieces: list[_Piece] = field(default_factory=list)
    language: str | None = None
    speller: NameSpeller | None = None
    """Set when the request brings names with a word the model does not know: those its decodes may need."""
    echo: PromptEcho | None = None
    quiet: bool = False
    """Its speech was found only below VAD_THRESHOLD: a piece Whisper does not hear as speech is dropped."""

    @property
    def window_s(self) -> float:
        """The encoder window the request asked for, at most Whisper's own."""
        return min(self.options.window_s, FULL_WINDOW_S)

    @property
    def fitted_frames(self) -> int:
        """That window in feature frames: its pieces start in it (one decoded again without names stays in it)."""
        return round(self.window_s * _FRAMES_PER_SECOND)

    def result(self) -> TranscriptResult:
        text = " ".join(piece.text for piece in self.pieces if piece.text).strip()
        return TranscriptResult(
            text=self.speller.spell(text) if self.speller else text,
            language=self.language or self.options.language or "en",
            audio_seconds=self.audio_seconds,
            speech_seconds=sum(len(piece.audio) for piece in self.pieces) / SAMPLE_RATE,
            stages=self.stages,
            fallbacks=sum(piece.redone for piece in self.pieces),
        )


@dataclass
class _Piece:
    """Speech that fits one encoder window."""

    request: _Request
    audio: np.ndarray
    window_frames: int
    text: str = ""
    recheck_frames: int = 0  # decode again in this window (wider, or the same with names); 0 when the text stands
    loops_in_full_window: bool = False
    redone: bool = False
    prompt: list[int] | None = None  # None until names were tried: then their tokens, or [] when they misled it
    encoded: tuple[int, ctranslate2.StorageView] | None = None
    """The window (frames) and encoder output of its last decode alone: a redo in that window decodes it again."""

    @property
    def names_prompt(self) -> list[int]:
        return self.prompt or []

    @property
    def may_need_names(self) -> bool:
        """Whether the request's names have not been tried on this piece yet."""
        return self.prompt is None and bool(self.request.speller)

    @property
    def token_cap(self) -> int:
        return _TOKEN_MARGIN + math.ceil(_TOKENS_PER_SECOND * len(self.audio) / SAMPLE_RATE)


def speech_pieces(
    audio: np.ndarray, options: DecodeOptions, window_s: float, threshold: float | None = None
) -> list[np.ndarray]:
    """The speech in the audio as Silero VAD finds it, joined into pieces no longer than the window.

    Speech longer than the window is cut at its longest pause, so no word is split where a pause exists. Silences of
    a second or more inside the speech shrink to twice SPEECH_PAD_MS: after a longer one the decoder tended to end
    the text, dropping what followed ("set the living room lights", 1.5 s, "to blue" lost "to blue").
    `threshold` replaces VAD_THRESHOLD.
    """
    vad_options = VadOptions(
        threshold=options.vad_threshold if threshold is None else threshold,
        min_speech_duration_ms=options.min_speech_duration_ms,
        max_speech_duration_s=min(options.max_speech_duration_s, window_s),
        speech_pad_ms=options.speech_pad_ms,
        min_silence_duration_ms=_SHORTENED_SILENCE_MS,
    )
    chunks = get_speech_timestamps(audio, vad_options)
    if not chunks:
        return []
    pieces, _ = collect_chunks(audio, chunks, max_duration=window_s)
    return [piece for piece in pieces if len(piece)]


def shared_out(pieces: list[_Piece], count: int) -> list[list[_Piece]]:
    """The pieces (in request order) in at most `count` shares of about equal size, no request split between two.

    A request's pieces stay together so that its language, detected from their encoder output, is decided once.
    """
    bounds = [0]
    for share in range(1, count):
        cut = max(bounds[-1], len(pieces) * share // count)
        while 0 < cut < len(pieces) and pieces[cut].request is pieces[cut - 1].request:
            cut += 1
        bounds.append(cut)
    bounds.append(len(pieces))
    return [pieces[start:end] for start, end in itertools.pairwise(bounds) if start < end]


def looks_looped(tokens: Sequence[int], text: str, token_cap: int) -> bool:
    """Whether a decode went round in circles: the token cap reached, a phrase repeated (or nearly), repetitive text."""
    if len(tokens) >= token_cap or get_compression_ratio(text) > _COMPRESSION_RATIO_LIMIT:
        return True
    words = _WORDS.findall(text.lower())
    for size in range(max(1, math.ceil(_REPEATED_WORDS / _REPEATS)), len(words) // _REPEATS + 1):
        for start in range(len(words) - size * _REPEATS + 1):
            phrase = words[start : start + size]
            if all(words[start + size * n : start + size * (n + 1)] == phrase for n in range(1, _REPEATS)):
                return True
    return _near_repeat(words)


def _near_repeat(words: list[str]) -> bool:
    """Whether a command-long phrase follows itself with a word more or less: a loop that is not word for word.

    Base wrote "set a timer for 10 minutes set timer for 10 minutes" for one command in a short window. Two
    commands alike ("turn on the kitchen light, turn on the kitchen fan") differ by more.
    """
    for size in range(_NEAR_REPEAT_WORDS[0], min(_NEAR_REPEAT_WORDS[1], (len(words) + 1) // 2) + 1):
        for start in range(len(words) - 2 * size + 2):
            phrase = words[start : start + size]
            for length in (size - 1, size, size + 1):
                follower = words[start + size : start + size + length]
                if (
                    len(follower) == length
                    and (follower[0], follower[-1]) == (phrase[0], phrase[-1])
                    and SequenceMatcher(None, phrase, follower).ratio() >= _NEAR_REPEAT_SIMILARITY
                ):
                    return True
    return False


def select_names(names: Sequence[str], encode: Callable[[str], list[int]], budget: int) -> list[int]:
    """The names as prompt tokens, as many as fit the budget: ", "-separated and ending with a full stop.

    The full stop makes the prompt read like a finished sentence before the speech: without it, base heard more of
    the ordinary commands wrong (the test set of bench/run --names). So do capitals: a list of names in title case
    made base write ordinary commands as names ("Got Height" for "good night"), so the words the tokenizer knows go
    in lower case ("Grünewald lamp"); the speller restores the home's spelling of the names it knows.

    Names with a word the tokenizer does not know as one token (Grünewald, Kaia) go first, in the order given:
    Whisper spells common words (Kitchen Light) right without help. A name that does not fit is skipped, so one
    long name does not keep the shorter ones after it out; a name already taken (case aside) is not repeated.
    """
    separator, stop = encode(","), encode(".")
    ranked = sorted(names, key=lambda name: not is_unusual(name, encode))  # stable: the given order in each group
    selected: list[int] = []
    seen: set[str] = set()
    for name in ranked:
        key = name.casefold()
        piece = [*(separator if selected else ()), *encode(" " + _prompt_form(name, encode))]
        if key in seen or len(selected) + len(piece) + len(stop) > budget:
            continue
        seen.add(key)
        selected += piece
    return [*selected, *stop] if selected else []


def is_unusual(name: str, encode: Callable[[str], list[int]]) -> bool:
    """Whether a name has a word the tokenizer does not know as one token (a word Whisper may not spell right)."""
    return any(_is_unusual_word(word, encode) for word in name.split())


def _is_unusual_word(word: str, encode: Callable[[str], list[int]]) -> bool:
    return len(encode(" " + word.lower().replace("'s", ""))) > 1


def _prompt_form(name: str, encode: Callable[[str], list[int]]) -> str:
    """The name as the prompt writes it: its unusual words as spelled, the others in lower case."""
    return " ".join(word if _is_unusual_word(word, encode) else word.lower() for word in name.split())


def weight_copies(device: Device, cpu_threads: CpuThreads) -> int:
    """How many copies of a model's weights the engine loads on the device.

    On a CPU with two workers or more, a batch that is one request would leave all but one worker idle: its encoder
    runs on every thread instead, in a second copy of the weights (CTranslate2 fixes a replica's threads when it
    loads).
    """
    return 2 if device.kind == "cpu" and cpu_threads.workers > 1 else 1


def resolve_device(setting: str) -> Device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a device this machine has."""
    gpus = ctranslate2.get_cuda_device_count()
    if setting == "auto":
        return Device("cuda", 0) if gpus > 0 else Device("cpu")
    if setting == "cpu":
        return Device("cpu")
    index = int(setting.partition(":")[2] or 0)
    if index >= gpus:
        found = f"{gpus} CUDA device(s)" if gpus else "no CUDA device"
        msg = f"device {setting} is not available: CTranslate2 sees {found}"
        raise UnsupportedOnDeviceError(msg)
    return Device("cuda", index)


def supported_compute_types(device: Device) -> list[str]:
    """Compute types CTranslate2 can run on the device."""
    return sorted(ctranslate2.get_supported_compute_types(device.kind, device.index))


def resolve_compute_type(requested: str, device: Device) -> tuple[str, str | None]:
    """Pick the compute type to load with, and a note when it differs from the one asked for."""
    supported = supported_compute_types(device)
    if requested == "auto":
        return ("float16" if "float16" in supported else "int8"), None
    if requested in supported:
        return requested, None
    if requested in _HALF_PRECISION and "int8" in supported:
        return "int8", f"{device} cannot compute in {requested}; using int8 instead"
    msg = f"{device} cannot compute in {requested}; it supports {', '.join(supported)}"
    raise UnsupportedOnDeviceError(msg)


class WhisperEngine:
    """One loaded Whisper model."""

    def __init__(self, *, name: str, path: Path, device: Device, compute_type: str, cpu_threads: CpuThreads) -> None:
        started = time.monotonic()
        _keep_blas_to_one_thread()
        self.name = name
        self.device = device
        self.compute_type = compute_type
        on_cpu = device.kind == "cpu"
        self.workers = cpu_threads.workers if on_cpu else 1
        self._model: WhisperModel | None = WhisperModel(
            str(path),
            device=device.kind,
            device_index=device.index,
            compute_type=compute_type,
            cpu_threads=cpu_threads.threads_per_worker if on_cpu else cpu_threads.total,
            num_workers=self.workers,
        )
        self._calls = ThreadPoolExecutor(self.workers, thread_name_prefix=f"decode-{name}")
        self.weight_copies = weight_copies(device, cpu_threads)
        self._wide_encoder: ctranslate2.models.Whisper | None = (
            ctranslate2.models.Whisper(
                str(path), device="cpu", compute_type=compute_type, intra_threads=cpu_threads.total, inter_threads=1
            )
            if self.weight_copies > 1
            else None
        )
        self.multilingual = bool(self._model.model.is_multilingual)
        self.languages: list[str] = sorted(_LANGUAGE_CODES) if self.multilingual else ["en"]
        self._tokenizers: dict[str, Tokenizer] = {}
        self._suppressed = list(get_suppressed_tokens(self._tokenizer("en"), (-1,)) or ())
        self._name_plans: dict[tuple[str, ...], tuple[NameSpeller, PromptEcho]] = {}
        self.load_seconds = time.monotonic() - started

    def warm_up(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        """Run the VAD and a decode in the fitted and in the full window, so the first request is like the rest."""
        tone = (0.1 * np.sin(np.linspace(0, 2 * np.pi * 440, SAMPLE_RATE))).astype(np.float32)
        get_speech_timestamps(tone, VadOptions())
        for window in (window_s, FULL_WINDOW_S):
            options = DecodeOptions("en", 5, 0.0, 0, FULL_WINDOW_S, 0, window_s=window)
            self._transcribe([(tone, options)] * self.workers, vad=False)  # one piece for each worker
            if self._wide_encoder is not None:
                self._transcribe([(tone, options)], vad=False)  # alone: the encoder on every thread

    def transcribe_batch(
        self, batch: Sequence[tuple[np.ndarray, DecodeOptions]], on_result: ResultCallback | None = None
    ) -> list[TranscriptResult]:
        """Transcribe several requests together; one result per request, in order.

        The pieces of different requests are only stacked into the same encoder and decoder calls. `on_result`
        hears of each request as soon as its text is final, so one that needs no redo in the full window does not
        wait for those that do.
        """
        return self._transcribe(batch, vad=True, on_result=on_result)

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> TranscriptResult:
        """Transcribe one request; silence gives empty text without running the model."""
        return self._transcribe([(audio, options)], vad=True)[0]

    def park(self, *, keep_in_host_memory: bool) -> None:
        """Give the device's memory back while keeping what `restore` needs; the caller ensures nothing runs.

        On a GPU the weights can wait in host memory (`keep_in_host_memory`), which makes `restore` a copy; on a CPU,
        and otherwise, they are unloaded completely and `restore` reads them from disk again.
        """
        to_cpu = keep_in_host_memory and self.device.kind != "cpu"
        deadline = time.monotonic() + _UNLOAD_PATIENCE_S
        for model in self._replicas():
            model.unload_model(to_cpu=to_cpu)
            while model.model_is_loaded:
                if time.monotonic() > deadline:
                    msg = f"CTranslate2 kept {self.name} loaded: it is still in use"
                    raise RuntimeError(msg)
                time.sleep(_UNLOAD_RETRY_S)
                model.unload_model(to_cpu=to_cpu)
        if not to_cpu:
            _return_freed_memory()
        _LOGGER.info("Parked %s (%s)", self.name, "weights in host memory" if to_cpu else "unloaded")

    def restore(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        """Bring parked weights back onto the device (from host memory, or from disk after a full unload).

        One short decode follows: the first call after a load sets up buffers, and it should not be a user's.
        """
        for model in self._replicas():
            model.load_model()
        options = DecodeOptions("en", 5, 0.0, 0, FULL_WINDOW_S, 0, window_s=window_s)
        request = _Request(1.0, options, dict.fromkeys(STAGES, 0.0))
        frames = request.fitted_frames
        self._decode([_Piece(request, np.zeros(SAMPLE_RATE, dtype=np.float32), frames)], 5, frames, alone=True)

    def close(self) -> None:
        """Free the model's memory now (GPU memory too) rather than whenever the garbage collector runs."""
        if self._model is None:
            return
        self._calls.shutdown()
        for model in self._replicas():
            model.unload_model()
        self._model = self._wide_encoder = None
        _LOGGER.info("Unloaded %s", self.name)

    def _transcribe(
        self,
        batch: Sequence[tuple[np.ndarray, DecodeOptions]],
        *,
        vad: bool,
        on_result: ResultCallback | None = None,
    ) -> list[TranscriptResult]:
        requests = [self._prepare(audio, options, vad=vad) for audio, options in batch]
        self._decode_grouped([piece for request in requests for piece in request.pieces])
        redo = [
            any(piece.recheck_frames or piece.loops_in_full_window for piece in request.pieces) for request in requests
        ]
        if on_result is not None:
            for index, request in enumerate(requests):
                if not redo[index]:
                    on_result(index, request.result())
        self._redo(requests)
        results = [request.result() for request in requests]
        if on_result is not None:
            for index, result in enumerate(results):
                if redo[index]:
                    on_result(index, result)
        return results

    def _decode_grouped(self, pieces: list[_Piece], stage: str = "") -> None:
        """Decode pieces in as few calls as their beam sizes, windows and prompt lengths allow, side by side.

        CTranslate2 decodes a batch only when the speech starts at the same position in every prompt: requests with
        the same names (one home) share calls, those with other names or none get their own. Each worker (of
        CTranslate2's inter_threads) takes a share of a group's requests.
        """
        groups: dict[tuple[int, int, int], list[_Piece]] = defaultdict(list)
        for piece in pieces:
            groups[piece.request.options.beam_size, piece.window_frames, len(piece.names_prompt)].append(piece)
        shares = [
            (share, beam_size, frames)
            for (beam_size, frames, _), grouped in groups.items()
            for share in shared_out(grouped, self.workers)
        ]
        if len(shares) == 1:
            timings = [self._decode_share(*shares[0], alone=True)]
        else:
            timings = list(self._calls.map(lambda share: self._decode_share(*share), shares))
        # A request whose pieces went to several shares waited for the longest of them (they ran side by side).
        spent: dict[tuple[int, str], float] = {}
        requests = {id(piece.request): piece.request for piece in pieces}
        for (share_pieces, _, _), timing in zip(shares, timings, strict=True):
            by_stage = {stage: sum(timing.values())} if stage else timing
            for key in {(id(piece.request), name) for piece in share_pieces for name in by_stage}:
                spent[key] = max(spent.get(key, 0.0), by_stage[key[1]])
        for (request, name), seconds in spent.items():
            requests[request].stages[name] += seconds

    def _decode_share(
        self, pieces: list[_Piece], beam_size: int, frames: int, *, alone: bool = False
    ) -> dict[str, float]:
        """One worker's share, in calls of a bounded size one after the other; the seconds spent by stage."""
        spent: dict[str, float] = defaultdict(float)
        for first in range(0, len(pieces), _PIECES_PER_CALL):
            chunk = pieces[first : first + _PIECES_PER_CALL]
            for name, seconds in self._decode(chunk, beam_size, frames, alone=alone).items():
                spent[name] += seconds
        return spent

    def _prepare(self, audio: np.ndarray, options: DecodeOptions, *, vad: bool) -> _Request:
        """A request's speech as pieces that fit its encoder window."""
        started = time.perf_counter()
        request = _Request(len(audio) / SAMPLE_RATE, options, dict.fromkeys(STAGES, 0.0))
        request.language = options.language if self.multilingual else "en"
        if options.names:
            request.speller, request.echo = self._name_plan(options.names)
        window_s = request.window_s
        speech = speech_pieces(audio, options, window_s) if vad else [audio[: int(window_s * SAMPLE_RATE)]]
        if not speech and vad and options.vad_threshold <= _QUIET_SPEECH_UP_TO:
            # Whispered speech, which Silero scores low; not when VAD_THRESHOLD was raised, which asks for strictness
            # (against a television, say).
            speech = speech_pieces(audio, options, window_s, options.vad_threshold * _QUIET_SPEECH_THRESHOLD)
            request.quiet = bool(speech)
        request.pieces = [_Piece(request, piece, request.fitted_frames) for piece in speech]
        request.stages["vad"] = time.perf_counter() - started
        return request

    def _redo(self, requests: list[_Request]) -> None:
        """Decode again what looped (in the full window), was unsure (in a wider one) or may need names (the same).

        With names, the first redo brings them, led by the names closest to what was heard; a piece that loops even
        in the full window is decoded once more without them, and what loops then gets faster-whisper's temperature
        fallback. A piece that repeats the names of its prompt is decoded again without them, in the same window.
        """
        pieces = [piece for request in requests for piece in request.pieces]
        while pending := [piece for piece in pieces if piece.recheck_frames]:
            started = time.perf_counter()
            for piece in pending:
                if piece.may_need_names:
                    piece.prompt = self._names_prompt(piece.request, piece.text)
                piece.window_frames, piece.recheck_frames, piece.redone = piece.recheck_frames, 0, True
            self._decode_grouped(pending, stage="fallback")
            _LOGGER.debug(
                "%d piece(s) decoded again in a wider window (%.0f ms)",
                len(pending),
                (time.perf_counter() - started) * 1000,
            )
        for piece in pieces:
            if piece.loops_in_full_window:
                self._decode_with_temperatures(piece)

    def _decode(self, pieces: list[_Piece], beam_size: int, frames: int, *, alone: bool = False) -> dict[str, float]:
        """Encode the pieces in one call, detect languages from that output, and decode them in one call.

        Returns the seconds spent on features, encoder and decoder.
        """
        model = self._require_model()
        started = time.perf_counter()
        encoded, featured = self._encode(pieces, frames, alone=alone)
        encoded_at = time.perf_counter()
        self._detect_languages(encoded, pieces)
        prompts = []
        for piece in pieces:
            tokenizer = self._tokenizer(piece.request.language or "en")
            previous = [tokenizer.sot_prev, *piece.names_prompt] if piece.names_prompt else []
            prompts.append([*previous, *tokenizer.sot_sequence, tokenizer.no_timestamps])
        caps = [min(piece.token_cap, _MAX_TOKENS - len(prompt)) for piece, prompt in zip(pieces, prompts, strict=True)]
        results = model.model.generate(
            encoded,
            prompts,
            beam_size=beam_size,
            max_length=max(len(prompt) + cap for prompt, cap in zip(prompts, caps, strict=True)),
            suppress_blank=True,
            suppress_tokens=self._suppressed,
            return_scores=True,
            return_no_speech_prob=True,
        )
        for piece, result, cap in zip(pieces, results, caps, strict=True):
            tokens = result.sequences_ids[0]
            piece.text = self._tokenizer(piece.request.language or "en").decode(tokens).strip()
            logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            looped = looks_looped(tokens, piece.text, cap)
            silent, unsure = result.no_speech_prob > _NO_SPEECH_PROB, logprob < _NOISE_LOGPROB
            if (silent or unsure) if piece.request.quiet else (silent and unsure):
                piece.text = ""  # noise, not speech (recheck_frames is still 0: nothing is decoded again)
            elif piece.names_prompt and piece.request.echo and piece.request.echo(piece.text):
                piece.recheck_frames, piece.prompt = frames, []  # the names misled it: again, without them
            elif looped and frames < _FULL_FRAMES:
                piece.recheck_frames = _FULL_FRAMES
            elif looped and piece.names_prompt:
                piece.recheck_frames, piece.prompt = _FULL_FRAMES, []  # once more, without names
            elif looped:
                piece.loops_in_full_window = True
            elif logprob < _UNSURE_LOGPROB and frames == piece.request.fitted_frames < _FULL_FRAMES:
                piece.recheck_frames = min(frames * _UNSURE_WIDENING, _FULL_FRAMES)  # with the names, if any
            elif piece.may_need_names and logprob < _UNSURE_WITHOUT_NAMES_LOGPROB:
                piece.recheck_frames = frames  # the same window, with the names
        finished = time.perf_counter()
        return {"features": featured - started, "encoder": encoded_at - featured, "decoder": finished - encoded_at}

    def _encode(self, pieces: list[_Piece], frames: int, *, alone: bool) -> tuple[ctranslate2.StorageView, float]:
        """The pieces' encoder output, and when their features were ready.

        A piece decoded again on its own in the window of its last decode (with the names, or without them after they
        misled it) reuses that decode's encoder output: the encoder is about half of a decode's time on a CPU.
        """
        kept = pieces[0].encoded if len(pieces) == 1 else None
        if kept is not None and kept[0] == frames:
            return kept[1], time.perf_counter()
        model = self._require_model()
        extract = model.feature_extractor
        features = np.stack([pad_or_trim(extract(piece.audio)[..., :-1], frames) for piece in pieces])
        featured = time.perf_counter()
        encoder = self._wide_encoder if alone and self._wide_encoder is not None else model.model
        encoded = encoder.encode(get_ctranslate2_storage(features))
        if len(pieces) == 1:
            pieces[0].encoded = (frames, encoded)
        return encoded, featured

    def _detect_languages(self, encoded: ctranslate2.StorageView, pieces: list[_Piece]) -> None:
        """Decide the language of each request without one from the encoder output already computed."""
        if not self.multilingual or all(piece.request.language for piece in pieces):
            return
        votes: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for piece, ranked in zip(pieces, self._require_model().model.detect_language(encoded), strict=True):
            for token, probability in ranked:
                votes[id(piece.request)][token[2:-2]] += probability
        for piece in pieces:
            if piece.request.language is None:
                scores = votes[id(piece.request)]
                piece.request.language = max(scores, key=scores.__getitem__)

    def _decode_with_temperatures(self, piece: _Piece) -> None:
        """A piece that loops even in the full window: faster-whisper's decode with its temperature fallback."""
        started = time.perf_counter()
        request = piece.request
        segments, _ = self._require_model().transcribe(
            piece.audio,
            language=request.language,
            beam_size=request.options.beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
            initial_prompt=piece.names_prompt or None,
        )
        piece.text = " ".join(segment.text.strip() for segment in segments).strip()
        piece.redone = True
        request.stages["fallback"] += time.perf_counter() - started

    def _names_prompt(self, request: _Request, heard: str) -> list[int]:
        """The prompt for a redo: the names most like what the first decode heard first, then the usual ones.

        Names that do not fit the prompt get their chance where the first decode heard something like them.
        """
        assert request.speller is not None  # noqa: S101 - only requests with names have a speller
        closest = request.speller.closest(heard, _CLOSEST_NAMES)
        return select_names([*closest, *request.options.names], self._tokenizer("en").encode, NAME_PROMPT_TOKENS)

    def _name_plan(self, names: tuple[str, ...]) -> tuple[NameSpeller, PromptEcho]:
        """The speller of a list of names' unusual names, and the check for a decode that echoes them.

        A client sends the same list with every request, so they are kept.
        """
        if names not in self._name_plans:
            if len(self._name_plans) >= _NAME_PLANS_KEPT:
                self._name_plans.clear()
            encode = self._tokenizer("en").encode
            self._name_plans[names] = (
                NameSpeller(name for name in names if is_unusual(name, encode)),
                PromptEcho(names, lambda word: is_unusual(word, encode)),
            )
        return self._name_plans[names]

    def _replicas(self) -> list[ctranslate2.models.Whisper]:
        """The CTranslate2 models that hold weights: the workers' and the wide encoder's."""
        return [self._require_model().model, *([self._wide_encoder] if self._wide_encoder else [])]

    def _tokenizer(self, language: str) -> Tokenizer:
        if language not in self._tokenizers:
            model = self._require_model()
            self._tokenizers[language] = Tokenizer(
                model.hf_tokenizer,
                self.multilingual,
                task="transcribe" if self.multilingual else None,
                language=language if self.multilingual else None,
            )
        return self._tokenizers[language]

    def _require_model(self) -> WhisperModel:
        if self._model is None:
            msg = f"model {self.name} was unloaded"
            raise RuntimeError(msg)
        return self._model


def _keep_blas_to_one_thread() -> None:
    """Run NumPy's BLAS (the feature extractor's matrix products) on the calling thread only.

    OpenBLAS's threads keep spinning for a while after each product, and on a CPU they took the cores the model's
    encoder ran on next: base's 10 s window took 130-150 ms after the features against 80-90 ms without them (2
    cores, two-thread encoder). The products are small enough that one thread loses nothing.
    """
    threadpool_limits(1, user_api="blas")


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the system, so an unloaded model leaves the process's RSS.

    Without it the allocator keeps most of the freed weights for later use; other C libraries have no such call.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
