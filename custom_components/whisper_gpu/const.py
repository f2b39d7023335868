"""Constants for the whisper-gpu integration."""

import logging
from datetime import timedelta
from typing import Final

DOMAIN: Final = "whisper_gpu"
LOGGER = logging.getLogger(__package__)

CONF_WYOMING_PORT: Final = "wyoming_port"
CONF_CONTROL_PORT: Final = "control_port"
CONF_SERVER_ID: Final = "id"
# The control API over HTTPS, verified against the system's CAs or against CONF_CA_PEM (PEM text, "" for none).
# Wyoming has no TLS: the speech-to-text port stays plain TCP.
CONF_TLS: Final = "tls"
CONF_CA_PEM: Final = "ca_pem"
# The zeroconf TXT property that says whether the control port speaks HTTPS ("true" or "false").
ZEROCONF_CONTROL_TLS: Final = "control_tls"

DEFAULT_WYOMING_PORT: Final = 10300
DEFAULT_CONTROL_PORT: Final = 10301

SCAN_INTERVAL: Final = timedelta(seconds=30)

# The server's runtime settings that the options flow offers, grouped as the form shows them.
# The server keeps them; Home Assistant keeps those the user changed in it (CONF_DESIRED_SETTINGS) for the replicas.
SETTING_MODEL: Final = "model"
SETTING_COMPUTE_TYPE: Final = "compute_type"
SETTING_LANGUAGE: Final = "language"
SETTING_BEAM_SIZE: Final = "beam_size"
# The language setting's value for "detect the spoken language".
LANGUAGE_AUTO: Final = "auto"
SETTING_VAD_THRESHOLD: Final = "vad_threshold"
SETTING_MIN_SPEECH_DURATION_MS: Final = "min_speech_duration_ms"
SETTING_MAX_SPEECH_DURATION_S: Final = "max_speech_duration_s"
SETTING_SPEECH_PAD_MS: Final = "speech_pad_ms"
SETTING_ENDPOINTING: Final = "endpointing"
SETTING_END_OF_SPEECH_S: Final = "end_of_speech_s"
SETTING_KEEP_ALIVE_S: Final = "keep_alive_s"

# Options of the integration itself, kept in entry.options beside the server's settings.
CONF_SEND_NAMES: Final = "send_names"
DEFAULT_SEND_NAMES: Final = True
SECTION_ASSIST: Final = "assist"
LOCAL_OPTIONS: Final[dict[str, tuple[str, ...]]] = {SECTION_ASSIST: (CONF_SEND_NAMES,)}
LOCAL_DEFAULTS: Final = {CONF_SEND_NAMES: DEFAULT_SEND_NAMES}

# The server settings the user chose in Home Assistant (options form, model select): the desired state of every
# replica, brought back onto any that differs.
CONF_DESIRED_SETTINGS: Final = "desired_settings"

SECTION_MODEL: Final = "model_settings"
SECTION_DECODING: Final = "decoding"
SECTION_VAD: Final = "voice_activity_detection"

OPTION_SECTIONS: Final[dict[str, tuple[str, ...]]] = {
    SECTION_MODEL: (SETTING_MODEL, SETTING_COMPUTE_TYPE, SETTING_KEEP_ALIVE_S),
    SECTION_DECODING: (SETTING_LANGUAGE, SETTING_BEAM_SIZE),
    SECTION_VAD: (
        SETTING_ENDPOINTING,
        SETTING_END_OF_SPEECH_S,
        SETTING_VAD_THRESHOLD,
        SETTING_MIN_SPEECH_DURATION_MS,
        SETTING_MAX_SPEECH_DURATION_S,
        SETTING_SPEECH_PAD_MS,
    ),
}

# Error codes of PATCH /api/v1/settings that the options form translates.
SETTINGS_ERROR_CODES: Final = frozenset(
    {
        "body_too_large",
        "insufficient_memory",
        "invalid_json",
        "invalid_value",
        "not_runtime",
        "not_supported_by_model",
        "not_supported_on_device",
        "out_of_range",
        "path_not_allowed",
        "reload_in_progress",
        "save_failed",
        "unknown_field",
        "unknown_model",
    }
)

# Codes of a failed model load (`last_failure` in the status) that have their own text; others get a general one.
LOAD_FAILURE_CODES: Final = frozenset(
    {
        "checksum_mismatch",
        "download_failed",
        "insufficient_disk",
        "insufficient_memory",
        "load_failed",
        "not_available_offline",
        "save_failed",
        "unknown_model",
    }
)

# Wyoming audio format: what Home Assistant's pipeline streams.
SAMPLE_RATE: Final = 16000
SAMPLE_WIDTH: Final = 2
SAMPLE_CHANNELS: Final = 1
