"""Config flow and options flow of the whisper-gpu integration."""

import asyncio
from collections.abc import Mapping
from typing import Any, override

import probatio
from homeassistant.config_entries import (
    SOURCE_HASSIO,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.const import CONF_HOST, CONF_TOKEN
from homeassistant.core import callback
from homeassistant.data_entry_flow import section
from homeassistant.helpers.selector import (
    BooleanSelector,
    LanguageSelector,
    LanguageSelectorConfig,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo

from .api import (
    LoadFailure,
    ServerInfo,
    WhisperGpuAuthError,
    WhisperGpuCertificateError,
    WhisperGpuClient,
    WhisperGpuConnectionError,
    WhisperGpuError,
    WhisperGpuInvalidCaError,
    WhisperGpuSettingsError,
)
from .const import (
    CONF_CA_PEM,
    CONF_CONTROL_PORT,
    CONF_DESIRED_SETTINGS,
    CONF_SERVER_ID,
    CONF_TLS,
    CONF_WYOMING_PORT,
    DEFAULT_CONTROL_PORT,
    DEFAULT_WYOMING_PORT,
    DOMAIN,
    LANGUAGE_AUTO,
    LOCAL_DEFAULTS,
    LOCAL_OPTIONS,
    OPTION_SECTIONS,
    SECTION_MODEL,
    SECTION_VAD,
    SETTING_COMPUTE_TYPE,
    SETTING_LANGUAGE,
    SETTING_MODEL,
    SETTING_VAD_THRESHOLD,
    SETTINGS_ERROR_CODES,
    ZEROCONF_CONTROL_TLS,
)
from .data import WhisperGpuConfigEntry, create_client
from .model_load import load_failure_key, load_failure_placeholders
from .replicas import ReplicaSet

PORT_SELECTOR = probatio.All(
    NumberSelector(NumberSelectorConfig(min=1, max=65535, step=1, mode=NumberSelectorMode.BOX)),
    probatio.Coerce(int),
)
TOKEN_SELECTOR = TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))
# The CA certificate (PEM) that the control port's certificate is verified against; empty: the system's CAs.
CA_PEM_FIELD = {probatio.Optional(CONF_CA_PEM): TextSelector(TextSelectorConfig(multiline=True))}

CONNECTION_SCHEMA = probatio.Schema(
    {
        probatio.Required(CONF_HOST): TextSelector(),
        probatio.Required(CONF_WYOMING_PORT, default=DEFAULT_WYOMING_PORT): (PORT_SELECTOR),
        probatio.Required(CONF_CONTROL_PORT, default=DEFAULT_CONTROL_PORT): (PORT_SELECTOR),
        probatio.Required(CONF_TOKEN): TOKEN_SELECTOR,
        probatio.Required(CONF_TLS, default=False): BooleanSelector(),
        **CA_PEM_FIELD,
    }
)
TOKEN_SCHEMA = probatio.Schema({probatio.Required(CONF_TOKEN): TOKEN_SELECTOR})
# A discovered server that speaks HTTPS: its certificate may be one of the user's own CA.
TOKEN_AND_CA_SCHEMA = probatio.Schema({probatio.Required(CONF_TOKEN): TOKEN_SELECTOR, **CA_PEM_FIELD})

# The options form's switch for the language setting's `auto`: detect the spoken language.
FIELD_DETECT_LANGUAGE = "detect_language"

# Units shown beside the voice activity detection values, by setting name suffix.
UNITS = {"_ms": "ms", "_s": "s"}


class WhisperGpuConfigFlow(ConfigFlow, domain=DOMAIN):
    """Add a whisper-gpu server: typed in, found by zeroconf, or the add-on."""

    VERSION = 1
    MINOR_VERSION = 1

    def __init__(self) -> None:
        """Start with nothing discovered."""
        self._discovered: dict[str, Any] = {}
        self._addon_name = ""

    @staticmethod
    @callback
    @override
    def async_get_options_flow(config_entry: WhisperGpuConfigEntry) -> WhisperGpuOptionsFlow:
        """Return the options flow: the server's settings."""
        return WhisperGpuOptionsFlow()

    async def _async_validate(self, data: Mapping[str, Any]) -> tuple[ServerInfo | None, dict[str, str]]:
        """Check the server before an entry is made: info (over HTTPS, its certificate), token, Wyoming port."""
        client = create_client(self.hass, data)
        try:
            info = await client.async_get_info()
            await client.async_check_auth()
        except WhisperGpuError as err:
            return None, await _async_control_error(client, err, tls=bool(data.get(CONF_TLS)))
        try:
            await client.async_describe()
        except WhisperGpuError:
            return None, {"base": "wyoming_unreachable"}
        return info, {}

    @override
    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the server's address, ports and token."""
        errors: dict[str, str] = {}
        if user_input is not None:
            data = _connection(user_input)
            info, errors = await self._async_validate(data)
            if info is not None:
                # A discovery card for the same server may be open: typing it in by hand still wins.
                await self.async_set_unique_id(info.server_id, raise_on_progress=False)
                self._abort_if_unique_id_configured(updates=data)
                return self.async_create_entry(title=info.name, data=data)
        return self.async_show_form(
            step_id="user",
            data_schema=self.add_suggested_values_to_schema(CONNECTION_SCHEMA, user_input),
            errors=errors,
        )

    @override
    async def async_step_zeroconf(self, discovery_info: ZeroconfServiceInfo) -> ConfigFlowResult:
        """Take a server that announces itself on the network."""
        properties = discovery_info.properties
        try:
            server_id = str(properties[CONF_SERVER_ID])
            control_port = int(properties[CONF_CONTROL_PORT])
            wyoming_port = discovery_info.port or int(properties[CONF_WYOMING_PORT])
        except KeyError, TypeError, ValueError:
            return self.async_abort(reason="not_whisper_gpu")

        connection = {
            CONF_HOST: discovery_info.host,
            CONF_WYOMING_PORT: wyoming_port,
            CONF_CONTROL_PORT: control_port,
            # Servers from before TLS announce no control_tls: plain HTTP.
            CONF_TLS: str(properties.get(ZEROCONF_CONTROL_TLS, "false")).lower() == "true",
        }
        entry = await self.async_set_unique_id(server_id)
        # The add-on's entry keeps the address the Supervisor gave it.
        addon = entry is not None and entry.source == SOURCE_HASSIO
        self._abort_if_unique_id_configured(updates=None if addon else connection)

        self._discovered = connection
        self.context["title_placeholders"] = {"name": discovery_info.host}
        return await self.async_step_zeroconf_confirm()

    async def async_step_zeroconf_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the token of a discovered server, and for a server that speaks HTTPS the CA it may need."""
        errors: dict[str, str] = {}
        tls = self._discovered[CONF_TLS]
        if user_input is not None:
            data = _connection({**self._discovered, **user_input})
            info, errors = await self._async_validate(data)
            if info is not None:
                return self.async_create_entry(title=info.name, data=data)
        return self.async_show_form(
            step_id="zeroconf_confirm",
            data_schema=self.add_suggested_values_to_schema(TOKEN_AND_CA_SCHEMA if tls else TOKEN_SCHEMA, user_input),
            description_placeholders={
                "host": self._discovered[CONF_HOST],
                "port": str(self._discovered[CONF_CONTROL_PORT]),
            },
            errors=errors,
        )

    @override
    async def async_step_hassio(self, discovery_info: HassioServiceInfo) -> ConfigFlowResult:
        """Take the server of the add-on, as the Supervisor announces it."""
        config = discovery_info.config
        try:
            server_id = str(config[CONF_SERVER_ID])
            # The add-on's control port speaks plain HTTP, on the Supervisor's internal network.
            data = _connection(
                {
                    CONF_HOST: str(config[CONF_HOST]),
                    CONF_WYOMING_PORT: int(config[CONF_WYOMING_PORT]),
                    CONF_CONTROL_PORT: int(config[CONF_CONTROL_PORT]),
                    CONF_TOKEN: str(config[CONF_TOKEN]),
                }
            )
        except KeyError, TypeError, ValueError:
            return self.async_abort(reason="not_whisper_gpu")

        await self.async_set_unique_id(server_id)
        self._abort_if_unique_id_configured(updates=data)

        self._discovered = data
        self._addon_name = discovery_info.name
        self.context["title_placeholders"] = {"name": discovery_info.name}
        self.context["configuration_url"] = f"homeassistant://hassio/addon/{discovery_info.slug}/info"
        return await self.async_step_hassio_confirm()

    async def async_step_hassio_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Confirm the add-on's server; nothing to type."""
        errors: dict[str, str] = {}
        if user_input is not None:
            info, errors = await self._async_validate(self._discovered)
            if info is not None:
                return self.async_create_entry(title=self._addon_name, data=self._discovered)
        return self.async_show_form(
            step_id="hassio_confirm",
            description_placeholders={"addon": self._addon_name},
            errors=errors,
        )

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Change the address, ports, token or HTTPS of a server."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            data = _connection(user_input)
            info, errors = await self._async_validate(data)
            if info is not None:
                await self.async_set_unique_id(info.server_id)
                self._abort_if_unique_id_mismatch(reason="wrong_server")
                return self.async_update_reload_and_abort(entry, data_updates=data)
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=self.add_suggested_values_to_schema(CONNECTION_SCHEMA, user_input or entry.data),
            errors=errors,
        )

    async def async_step_reauth(
        self,
        entry_data: Mapping[str, Any],  # noqa: ARG002 - the token is asked for anew
    ) -> ConfigFlowResult:
        """Start over with a new token after the server rejected the old one."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the new token."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            info, errors = await self._async_validate({**entry.data, **user_input})
            if info is not None:
                return self.async_update_reload_and_abort(entry, data_updates=user_input)
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=TOKEN_SCHEMA,
            description_placeholders={"host": entry.data[CONF_HOST]},
            errors=errors,
        )


class WhisperGpuOptionsFlow(OptionsFlow):
    """The server's settings, read from it and sent back to every replica, and the integration's own options.

    The form shows the settings of the first replica that answers and sends only
    what the user changed, so a setting the operator changed on the server and
    the user left alone stays the operator's. What the user changed becomes the
    desired state of every replica (entry.options[desired_settings], see
    replicas.py), beside the integration's own options (sending the names of the
    home). A change that loads a model shows the load's progress and ends when
    the first replica serves the new model, or back at the form with the reason
    it failed (and no other replica was sent it).
    """

    def __init__(self) -> None:
        """Start before the server has been read."""
        self._info: ServerInfo | None = None
        self._settings: dict[str, Any] = {}
        self._client: WhisperGpuClient | None = None
        self._load: asyncio.Task[LoadFailure | None] | None = None
        self._loading_model = ""
        self._errors: dict[str, str] = {}
        self._placeholders: dict[str, str] = {}
        self._local: dict[str, Any] = {}

    def _replica_set(self) -> ReplicaSet:
        """The replicas of the entry: the coordinator's when the entry is loaded, else a set of the form's own."""
        entry: WhisperGpuConfigEntry = self.config_entry
        if entry.state is ConfigEntryState.LOADED:
            return entry.runtime_data.coordinator.replica_set
        return ReplicaSet(self.hass, entry)

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Show the settings in sections; send what changed to the replicas."""
        replica_set = self._replica_set()
        if self._info is None:
            try:
                self._client, self._info, self._settings = await replica_set.async_read()
            except WhisperGpuError:
                return self.async_abort(reason="cannot_connect")

        # After a failed load: the reason, and the settings the server kept.
        errors, self._errors = self._errors, {}
        placeholders, self._placeholders = self._placeholders, {}
        self._local = {name: self.config_entry.options.get(name, default) for name, default in LOCAL_DEFAULTS.items()}
        suggested = {**self._settings, **self._local}
        if user_input is not None:
            suggested = _flatten(user_input)
            self._local = {name: value for name, value in suggested.items() if name in LOCAL_DEFAULTS}
            changes = {
                name: value
                for name, value in suggested.items()
                if name not in LOCAL_DEFAULTS and self._settings.get(name) != value
            }
            try:
                change = await replica_set.async_start_change(changes) if changes else None
            except WhisperGpuAuthError:
                self.config_entry.async_start_reauth(self.hass)
                errors["base"] = "invalid_auth"
            except WhisperGpuSettingsError as err:
                errors = _form_errors(err.errors)
            except WhisperGpuError:
                errors["base"] = "cannot_connect"
            else:
                if change is None:
                    return self._async_saved()
                self._client, self._settings = change.client, change.settings
                if not change.loading:
                    await change.done
                    await self._async_refresh_entry()
                    return self._async_saved()
                await self._async_refresh_entry()
                self._loading_model = str(self._settings.get(SETTING_MODEL, ""))
                self._load = change.done
                return await self.async_step_load()

        return self.async_show_form(
            step_id="init",
            data_schema=self.add_suggested_values_to_schema(
                _options_schema(self._info, self._settings),
                _sectioned(suggested, _default_language(self.hass.config.language, self._info)),
            ),
            errors=errors,
            description_placeholders=placeholders,
        )

    async def async_step_load(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:  # noqa: ARG002
        """Show the load's progress until the server serves the new model or gives up on it."""
        assert self._load is not None  # noqa: S101 - set by the step that starts the load
        assert self._client is not None  # noqa: S101 - the replica that took the change
        if not self._load.done():
            return self.async_show_progress(
                step_id="load",
                progress_action="load",
                progress_task=self._load,
                description_placeholders={"model": self._loading_model},
            )
        client = self._client
        try:
            failure = self._load.result()
            # The server takes back the whole change when the load fails; the form shows what it kept.
            self._settings = await client.async_get_settings()
            if failure is None:
                self._info = await client.async_get_info()  # the new model's languages
        except TimeoutError:
            self._errors = {"base": "load_timeout"}
            self._placeholders = {"model": self._loading_model}
            return self.async_show_progress_done(next_step_id="init")
        except WhisperGpuError:
            self._errors = {"base": "cannot_connect"}
            return self.async_show_progress_done(next_step_id="init")
        finally:
            self._load = None
            await self._async_refresh_entry()
        if failure is not None:
            self._errors = {SECTION_MODEL: load_failure_key(failure)}
            self._placeholders = load_failure_placeholders(failure)
            return self.async_show_progress_done(next_step_id="init")
        return self.async_show_progress_done(next_step_id="loaded")

    async def async_step_loaded(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:  # noqa: ARG002
        """The new model serves: the change is done."""
        return self._async_saved()

    @callback
    def _async_saved(self) -> ConfigFlowResult:
        """End the flow: the replicas have their settings, entry.options the integration's own and the desired ones."""
        desired = self.config_entry.options.get(CONF_DESIRED_SETTINGS)
        return self.async_create_entry(data={**self._local, CONF_DESIRED_SETTINGS: desired} if desired else self._local)

    async def _async_refresh_entry(self) -> None:
        """Let the entities follow the server now (the coordinator polls quickly while a model loads).

        Not the debounced request: one made when the load started would hold back the one made when it ended, and
        the device page would show the old model after the dialog said the new one serves.
        """
        entry: WhisperGpuConfigEntry = self.config_entry
        if entry.state is ConfigEntryState.LOADED:
            await entry.runtime_data.coordinator.async_refresh()


def _connection(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the connection an entry keeps: address, ports, token, HTTPS (off unless asked for) and its CA.

    The CA is kept with HTTPS only, as PEM text ending in a newline; "" for none (the system's CAs). Both keys are
    always there, so that a reconfiguration or a repeated setup replaces a CA given before.
    """
    tls = bool(data.get(CONF_TLS, False))
    ca_pem = str(data.get(CONF_CA_PEM) or "").strip() if tls else ""
    return {
        CONF_HOST: data[CONF_HOST],
        CONF_WYOMING_PORT: data[CONF_WYOMING_PORT],
        CONF_CONTROL_PORT: data[CONF_CONTROL_PORT],
        CONF_TOKEN: data[CONF_TOKEN],
        CONF_TLS: tls,
        CONF_CA_PEM: f"{ca_pem}\n" if ca_pem else "",
    }


async def _async_control_error(client: WhisperGpuClient, err: WhisperGpuError, *, tls: bool) -> dict[str, str]:
    """Return the form error for a control port that failed the check.

    A connection that failed may be HTTPS asked of a plain HTTP port, or plain HTTP of an HTTPS port: a TLS
    handshake with the port tells which, so that the form says so rather than "cannot connect".
    """
    if isinstance(err, WhisperGpuInvalidCaError):
        return {CONF_CA_PEM: "invalid_ca"}
    if isinstance(err, WhisperGpuCertificateError):
        return {"base": "untrusted_certificate"}
    if isinstance(err, WhisperGpuConnectionError):
        speaks_tls = await client.async_probe_tls()
        mismatch = speaks_tls is not None and speaks_tls != tls
        return {"base": ("tls_required" if speaks_tls else "tls_not_supported") if mismatch else "cannot_connect"}
    return {"base": "invalid_auth" if isinstance(err, WhisperGpuAuthError) else "not_whisper_gpu"}


def _flatten(user_input: Mapping[str, Any]) -> dict[str, Any]:
    """Return the values of the form's sections as one flat dict of settings.

    The form shows the language as a switch (detect it) and a language picker;
    the server has one setting, `auto` when the language is detected.
    """
    flat = {name: value for values in user_input.values() for name, value in values.items()}
    if flat.pop(FIELD_DETECT_LANGUAGE, False):
        flat[SETTING_LANGUAGE] = LANGUAGE_AUTO
    return flat


def _sectioned(settings: Mapping[str, Any], default_language: str) -> dict[str, dict[str, Any]]:
    """Return flat settings grouped as the form's sections, the language as the switch and the picker."""
    values = dict(settings)
    if SETTING_LANGUAGE in values:
        detect = values[SETTING_LANGUAGE] == LANGUAGE_AUTO
        values[FIELD_DETECT_LANGUAGE] = detect
        if detect:
            values[SETTING_LANGUAGE] = default_language
    return {
        section_key: {name: values[name] for name in _form_fields(names) if name in values}
        for section_key, names in (OPTION_SECTIONS | LOCAL_OPTIONS).items()
    }


def _form_fields(names: tuple[str, ...]) -> list[str]:
    """Return a section's fields: its settings, the language preceded by its switch."""
    fields: list[str] = []
    for name in names:
        fields.extend((FIELD_DETECT_LANGUAGE, name) if name == SETTING_LANGUAGE else (name,))
    return fields


def _default_language(configured: str, info: ServerInfo) -> str:
    """Return the language the picker offers while the server detects it: Home Assistant's, if the model speaks it."""
    languages = _fixed_languages(info)
    base = configured.replace("_", "-").partition("-")[0].lower()
    return base if base in languages or not languages else languages[0]


def _fixed_languages(info: ServerInfo) -> list[str]:
    """Return the languages the server can be fixed to (all but `auto`)."""
    return [language for language in info.languages if language != LANGUAGE_AUTO]


def _form_errors(server_errors: Mapping[str, str]) -> dict[str, str]:
    """Map the server's error codes to form errors, shown on the field's section."""
    section_of = {name: section_key for section_key, names in OPTION_SECTIONS.items() for name in names}
    return {
        section_of.get(field, "base"): (code if code in SETTINGS_ERROR_CODES else "unknown_setting_error")
        for field, code in server_errors.items()
    }


def _options_schema(info: ServerInfo, settings: Mapping[str, Any]) -> probatio.Schema:
    """Build the options form from what the server offers."""
    sections: dict[probatio.Marker, section] = {}
    for section_key, names in OPTION_SECTIONS.items():
        fields: dict[probatio.Marker, Any] = {}
        for name in names:
            if name not in info.settings_schema:
                continue
            if name == SETTING_LANGUAGE and LANGUAGE_AUTO in info.languages:
                fields[probatio.Required(FIELD_DETECT_LANGUAGE)] = BooleanSelector()
            fields[probatio.Required(name)] = _setting_selector(name, info, settings)
        if fields:
            sections[probatio.Required(section_key)] = section(
                probatio.Schema(fields), {"collapsed": section_key == SECTION_VAD}
            )
    for section_key, names in LOCAL_OPTIONS.items():
        fields = {probatio.Required(name): BooleanSelector() for name in names}
        sections[probatio.Required(section_key)] = section(probatio.Schema(fields), {"collapsed": False})
    return probatio.Schema(sections)


def _setting_selector(name: str, info: ServerInfo, settings: Mapping[str, Any]) -> Any:
    """Return the selector of one setting, from the server's schema of it."""
    if name == SETTING_MODEL:
        models = info.usable_models
        if (current := settings.get(name)) and current not in models:
            models = [*models, current]
        # Custom values: a model directory or a hub repository id.
        return _select(models, custom_value=True)
    if name == SETTING_COMPUTE_TYPE:
        return _select(["auto", *(t for t in info.compute_types if t != "auto")])
    if name == SETTING_LANGUAGE:
        # The frontend names each language (in the user's language); `auto` is the switch before it.
        languages = _fixed_languages(info)
        if (current := settings.get(name)) and current != LANGUAGE_AUTO and current not in languages:
            languages = [*languages, current]
        return LanguageSelector(LanguageSelectorConfig(languages=languages))
    if info.settings_schema[name].get("type") == "boolean":
        return BooleanSelector()
    return _number_selector(name, info.settings_schema[name])


def _number_selector(name: str, schema: Mapping[str, Any]) -> Any:
    """Return a number box (a slider for the VAD threshold) within the schema's range."""
    config = NumberSelectorConfig(mode=NumberSelectorMode.BOX)
    if "min" in schema:
        config["min"] = schema["min"]
    if "max" in schema:
        config["max"] = schema["max"]
    for suffix, unit in UNITS.items():
        if name.endswith(suffix):
            config["unit_of_measurement"] = unit
    if schema.get("type") == "integer":
        config["step"] = 1
        return probatio.All(NumberSelector(config), probatio.Coerce(int))
    config["step"] = "any"
    if name == SETTING_VAD_THRESHOLD and "min" in config and "max" in config:
        config["mode"] = NumberSelectorMode.SLIDER
        config["step"] = 0.01
    return NumberSelector(config)


def _select(options: list[str], *, custom_value: bool = False) -> SelectSelector:
    """Return a drop-down of the given values."""
    return SelectSelector(
        SelectSelectorConfig(
            options=options,
            mode=SelectSelectorMode.DROPDOWN,
            custom_value=custom_value,
            sort=False,
        )
    )
