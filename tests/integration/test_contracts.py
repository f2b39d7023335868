"""Contracts between the server and the integration: the vocabulary both sides spell out must be the same.

The integration cannot import the server (Home Assistant installs it alone), so it keeps its own copy of the
error codes it translates, the model states its sensor offers and the names of the settings it sends. These tests
load both packages and fail on any difference.
"""

import ast
import inspect

from whisper_gpu import control
from whisper_gpu.service import ModelState
from whisper_gpu.settings import RUNTIME_SETTINGS, SETTINGS, ErrorCode

from custom_components.whisper_gpu import coordinator, sensor
from custom_components.whisper_gpu.const import OPTION_SECTIONS, SETTING_MODEL, SETTINGS_ERROR_CODES

# Runtime settings the options form leaves out on purpose; a new server setting must be added to the form or here.
NOT_IN_THE_FORM = {
    "device": "the hardware is the operator's choice, made where the server runs",
    "partial_interval_s": "a tuning knob of streaming, not of the assistant",
    "encoder_window_s": "a tuning knob of speed, not of the assistant",
    "max_queue": "a limit of the server's capacity, set by the operator",
    "max_audio_s": "a limit of the server's capacity, set by the operator",
    "log_transcripts": "privacy: the operator decides what the server's log holds",
    "low_memory_switch": "a trade-off of the server's memory, set by the operator",
    "park_mode": "how a GPU parks depends on the host's memory, which the operator knows",
    "use_names": "the integration's own option (send_names) decides whether it sends names at all",
}
# Not settings errors: 401 starts reauthentication; the park and restore actions' refusals show through the
# Free GPU memory button's `park_refused` message with the code.
NOT_A_SETTINGS_ERROR = {"unauthorized", "model_not_ready", "restore_failed"}


def _control_error_codes() -> set[str]:
    """The codes control.py answers with literally: {"error": "..."} and {"errors": {"base": "..."}}."""
    codes = set()
    for node in ast.walk(ast.parse(inspect.getsource(control))):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value in ("error", "base") and isinstance(value, ast.Constant):
                codes.add(value.value)
    return codes


def test_every_settings_error_of_the_server_is_translated_and_no_other() -> None:
    """A code the server answers a PATCH with shows as a translated form error; the integration invents none."""
    server_codes = {str(code) for code in ErrorCode} | (_control_error_codes() - NOT_A_SETTINGS_ERROR)
    assert server_codes == set(SETTINGS_ERROR_CODES)


def test_the_model_states_are_the_servers() -> None:
    """The model state sensor offers exactly the server's states, and the repair issue knows which one failed."""
    assert [str(state) for state in ModelState] == sensor.MODEL_STATES
    assert coordinator.STATE_FAILED == ModelState.FAILED


def test_the_settings_the_integration_sends_are_runtime_settings_of_the_server() -> None:
    """Every name in the options form and the model select is a setting the server changes while it runs."""
    form = [name for names in OPTION_SECTIONS.values() for name in names]
    assert SETTING_MODEL in form
    assert set(form) <= set(RUNTIME_SETTINGS)
    assert len(form) == len(set(form))


def test_every_runtime_setting_is_in_the_form_or_left_out_on_purpose() -> None:
    """A runtime setting added to the server needs a decision here: in the form, or left out with a reason."""
    form = {name for names in OPTION_SECTIONS.values() for name in names}
    assert set(RUNTIME_SETTINGS) - form == set(NOT_IN_THE_FORM)
    assert all(SETTINGS[name].runtime for name in NOT_IN_THE_FORM)
