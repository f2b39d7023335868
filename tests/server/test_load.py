"""A small load run in CI: many real-time clients at once; `scripts/load.py` runs a hundred and prints figures."""

from __future__ import annotations

import jiwer
from helpers.load import run_load
from helpers.server import ServerProcess
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer

normalize = EnglishTextNormalizer()
CLIENTS = 20


async def test_clients_at_once_in_real_time_each_get_a_transcript_or_server_busy(
    whisper_server: ServerProcess, commands: list[Utterance]
) -> None:
    report = await run_load(whisper_server.wyoming_port, commands, CLIENTS, answer_timeout_s=120)
    assert [result.outcome for result in report.results if result.outcome not in ("transcript", "refused")] == [], (
        report.summary()
    )
    assert all(result.code == "server_busy" for result in report.results if result.outcome == "refused")
    heard = [result for result in report.results if result.outcome == "transcript"]
    assert heard, report.summary()
    # Each client gets its own words back (tiny.en on synthetic speech).
    references = [normalize(result.utterance.text) for result in heard]
    assert jiwer.wer(references, [normalize(result.text) or "-" for result in heard]) <= 0.25, report.summary()
