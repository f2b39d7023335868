"""The fast tests' JSON fixtures are what the real server answers today, so they cannot drift silently.

On a failure, run scripts/capture-fixtures and review the diff: the integration's fast tests then run against the
server's new answers.
"""

from helpers.api_fixtures import ENDPOINTS, SERVER_ARGS, capture, load, masked

from .common import SERVER_ARGS as TEST_SERVER_ARGS
from .common import WhisperGpuServer

# Which compute types a CPU offers depends on its instruction set: only their form is compared.
HOST_DEPENDENT = {"info": ("compute_types",)}


async def test_fixtures_match_a_fresh_server(own_server: WhisperGpuServer) -> None:
    """A server started as the capture starts it answers exactly what the fixtures hold."""
    assert list(TEST_SERVER_ARGS) == SERVER_ARGS
    own_server.start()

    live = await capture(own_server)

    assert set(live) == {*ENDPOINTS, "describe"}
    for name, answer in live.items():
        stored = load(name)
        for key in HOST_DEPENDENT.get(name, ()):
            assert masked(answer.pop(key)) == masked(stored.pop(key)), f"{name}.{key}"
        assert answer == stored, f"{name}.json differs from the server's answer: run scripts/capture-fixtures"
