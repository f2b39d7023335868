"""The walk a user takes in Home Assistant's frontend, in headless Chromium (issue 11 step 4).

Debian's `chromium` (scripts/ha-e2e-browser installs it) driven by Playwright for Python through its
`executable_path`: Playwright's own browser download is not used. The walk logs in as the owner, switches the
model in the integration's options dialog and watches the dialog follow the load, checks the server through its
control API, runs an Assist pipeline on the new model and reads the device page; then it tries a model that
cannot be had offline and reads what the dialog and the device page say. Screenshots of each screen go to
tests/e2e/artifacts/ (PNG); docs/home-assistant.md shows copies of them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from .harness import OWNER_PASSWORD, OWNER_USERNAME, E2EServer, HomeAssistant, spoken_command, step
from .harness import HomeAssistantError as HarnessError

# Where a browser is looked for: WHISPER_GPU_CHROMIUM, else `chromium` on PATH (Debian's package).
CHROMIUM_ENV = "WHISPER_GPU_CHROMIUM"
NEW_MODEL = "base"
# A model id that looks like a Hugging Face repository and that the offline server cannot get.
UNOBTAINABLE_MODEL = "nobody/whisper-nowhere"
COMMAND = "turn on the kitchen light"
# How soon the device page must show what the server serves, once the dialog says the load is done.
DEVICE_PAGE_WITHIN_S = 5.0
VIEWPORT = {"width": 1280, "height": 900}
normalize = EnglishTextNormalizer()
T = TypeVar("T")


def in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end (WebSocket API calls) beside Playwright's sync API, which holds this thread's loop."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


def chromium_executable() -> str | None:
    """The Chromium to drive, if there is one."""
    chosen = os.environ.get(CHROMIUM_ENV)
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Headless Chromium under Playwright; the walk is skipped, loudly, where either is missing."""
    executable = chromium_executable()
    reason = None
    if executable is None:
        reason = (
            f"{CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]} is not an executable"
            if os.environ.get(CHROMIUM_ENV)
            else "Chromium is not installed: run scripts/ha-e2e-browser (Debian's chromium) to walk the frontend"
        )
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only the e2e environment has it
    except ImportError:
        reason = "Playwright for Python is not installed (scripts/ha-e2e-env installs it)"
    if reason is not None:
        # Said on the terminal, not only in the skip summary: a missing browser must never go unnoticed.
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"SKIPPED the browser walk: {reason}", yellow=True, bold=True)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root (in CI, in a chroot), where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser: Any, home_assistant: HomeAssistant, artifacts_dir: Path) -> Iterator[Any]:
    """A logged-in page of the frontend, in English; on a failure its screen and HTML are kept for a look."""
    context = browser.new_context(viewport=VIEWPORT, locale="en-US")
    context.set_default_timeout(30_000)
    opened = context.new_page()
    with step("browser: log in"):
        opened.goto(home_assistant.url + "/")
        opened.get_by_role("textbox", name="Username").fill(OWNER_USERNAME)
        opened.get_by_role("textbox", name="Password").fill(OWNER_PASSWORD)
        opened.get_by_role("button", name="Log in").click()
        opened.wait_for_url(lambda url: "auth_callback" not in url and "/auth/" not in url)
        opened.locator("home-assistant-main").wait_for()
    if in_thread(http_config_reverts(home_assistant)):
        # Home Assistant 2026.11 asks to confirm the HTTP settings of configuration.yaml (loopback, the test's
        # port), and would go back to its defaults after five minutes: confirm, as the owner would.
        with step("browser: confirm the HTTP settings"):
            opened.locator("dialog-http-pending-config").get_by_role("button", name="Confirm").click()
            deadline = time.monotonic() + 10
            while in_thread(http_config_reverts(home_assistant)) and time.monotonic() < deadline:
                time.sleep(0.2)
    yield opened
    context.close()


async def http_config_reverts(home_assistant: HomeAssistant) -> bool:
    """Whether Home Assistant will take back its HTTP settings unless the owner confirms them."""
    async with home_assistant.websocket() as ws:
        try:
            config = await ws.command("http/config")
        except HarnessError:  # a release without the confirmation
            return False
    return bool(config.get("revert_at"))


@pytest.fixture(scope="module")
def serving_model_restored(e2e_server: E2EServer) -> Iterator[None]:
    """The session's server serves tiny.en again afterwards: the other end-to-end tests expect it."""
    yield
    status, body = e2e_server.request("PATCH", "/api/v1/settings", {"model": "tiny.en"}, token=e2e_server.token)
    assert status == 200, body
    wait_for_status(e2e_server, lambda status: status["target"] is None and serving(status) == "tiny.en")


def serving(status: dict[str, Any]) -> str | None:
    """The model the server serves, from its status."""
    return (status.get("model") or {}).get("name")


def wait_for_status(server: E2EServer, done: Any, timeout: float = 120) -> dict[str, Any]:
    """Poll the control API's status until `done(status)`."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, status = server.request("GET", "/api/v1/status")
        if isinstance(status, dict) and done(status):
            return status
        time.sleep(0.2)
    msg = f"status never got there: {status}"
    raise AssertionError(msg)


@pytest.fixture(autouse=True)
def screen_kept_on_failure(request: pytest.FixtureRequest, artifacts_dir: Path) -> Iterator[None]:
    """When a step fails, the screen and the page's HTML are kept in the artifacts, to see what the user saw."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "page" in request.fixturenames:
        page = request.getfixturevalue("page")
        page.screenshot(path=artifacts_dir / f"failed-{request.node.name}.png")
        (artifacts_dir / f"failed-{request.node.name}.html").write_text(page.content(), encoding="utf-8")


def shoot(page: Any, artifacts_dir: Path, name: str) -> Path:
    """A PNG of the screen as the user sees it."""
    path = artifacts_dir / f"{name}.png"
    page.screenshot(path=path)
    return path


def open_options(page: Any, home_assistant: HomeAssistant) -> Any:
    """The integration's page, then its options dialog (the cog), as a user opens it; the dialog."""
    page.goto(f"{home_assistant.url}/config/integrations/integration/whisper_gpu")
    page.get_by_role("button", name="Configure").first.click()
    dialog = page.locator("dialog-data-entry-flow")
    dialog.get_by_text("Server settings").wait_for()
    # The helper texts are markdown, rendered a moment after the form.
    dialog.get_by_text("Only models that fit the server's memory are listed").wait_for()
    return dialog


def choose_model(dialog: Any, model: str, *, listed: bool = True) -> None:
    """Pick a model in the form's Model field (a picker that takes typed values), then submit."""
    field = dialog.get_by_label("Model", exact=True)
    field.click()
    picker = dialog.page.locator("ha-picker-combo-box").first
    picker.locator("input").first.fill(model)
    # The list filters as one types; a name it does not hold is offered as a custom item.
    item = picker.get_by_text(model, exact=True) if listed else picker.get_by_text("Add custom item")
    item.first.click()
    field.get_by_text(model, exact=True).wait_for()
    dialog.get_by_role("button", name="Submit").click()


def open_device_page(page: Any, home_assistant: HomeAssistant) -> None:
    """The server's device page, from the integration's page."""
    device_id = in_thread(device_of(home_assistant))
    page.goto(f"{home_assistant.url}/config/devices/device/{device_id}")
    page.get_by_text("Loaded model").first.wait_for()


async def device_of(home_assistant: HomeAssistant) -> str:
    """The device of our config entry."""
    async with home_assistant.websocket() as ws:
        devices = await ws.command("config/device_registry/list")
    entry_id = home_assistant.entry_ids["whisper_gpu"]
    (device,) = [device for device in devices if entry_id in device["config_entries"]]
    return str(device["id"])


def sensor_shows(page: Any, name: str, value: str) -> Any:
    """The device page's row of a sensor, by its name, once it shows the value (whole words)."""
    return (
        page.locator("hui-sensor-entity-row")
        .filter(has_text=name)
        .filter(has_text=re.compile(rf"(^|\s){re.escape(value)}(\s|$)"))
    )


def transcribe_through_a_pipeline(home_assistant: HomeAssistant, tmp_path: Path) -> str:
    """A spoken command through an Assist pipeline with our speech-to-text entity: its text."""
    command = spoken_command(COMMAND, tmp_path)

    async def run() -> str:
        async with home_assistant.websocket() as ws:
            (stt_entity,) = await ws.entities("whisper_gpu", "stt")
            pipeline_id = await ws.create_pipeline("whisper-gpu browser walk", stt_entity)
            result = await ws.run_stt(pipeline_id, command.audio, speech_end_s=command.speech_end_s)
        return result.stt_text

    return in_thread(run())


@pytest.mark.usefixtures("serving_model_restored")
def test_switch_the_model_in_the_options_dialog(
    page: Any, home_assistant: HomeAssistant, e2e_server: E2EServer, artifacts_dir: Path, tmp_path: Path
) -> None:
    """Submit a new model: the dialog shows the load, then success; server, pipeline and device page follow."""
    with step("browser: open the options dialog"):
        dialog = open_options(page, home_assistant)
        # Language by name, detection as a switch: no raw codes.
        assert dialog.get_by_text("Detect the language").count() > 0
        dialog.get_by_label("Language", exact=True).get_by_text("English", exact=True).wait_for()
        shoot(page, artifacts_dir, "options-form")

    with step("browser: switch the model"):
        choose_model(dialog, NEW_MODEL)
        dialog.get_by_text(f"The server is loading {NEW_MODEL}").or_(dialog.get_by_text("saved")).first.wait_for()
        if dialog.get_by_text(f"The server is loading {NEW_MODEL}").count():
            shoot(page, artifacts_dir, "options-loading")
        dialog.get_by_text("saved").wait_for(timeout=120_000)
        done = time.monotonic()
        shoot(page, artifacts_dir, "options-saved")

    status = wait_for_status(e2e_server, lambda status: status["target"] is None, timeout=5)
    assert (status["state"], serving(status)) == ("ready", NEW_MODEL), status

    with step("browser: device page shows the new model"):
        dialog.get_by_role("button", name="Finish").click()
        open_device_page(page, home_assistant)
        sensor_shows(page, "Loaded model", NEW_MODEL).wait_for(timeout=DEVICE_PAGE_WITHIN_S * 1000)
        print(f"device page shows {NEW_MODEL} {time.monotonic() - done:.1f} s after the dialog said it was done")
        assert time.monotonic() - done < DEVICE_PAGE_WITHIN_S + 10  # the page itself had to load, too
        shoot(page, artifacts_dir, "device-page")

    with step("pipeline run on the new model"):
        text = transcribe_through_a_pipeline(home_assistant, tmp_path)
    assert normalize(text) == normalize(COMMAND)
    assert f"model {NEW_MODEL}, outcome ok" in e2e_server.log()


@pytest.mark.usefixtures("serving_model_restored")
def test_a_model_that_cannot_be_loaded(
    page: Any, home_assistant: HomeAssistant, e2e_server: E2EServer, artifacts_dir: Path
) -> None:
    """The dialog says why, in words; the device page still says Ready with the model that serves."""
    before = serving(wait_for_status(e2e_server, lambda status: status["target"] is None))

    with step("browser: try a model that cannot be had"):
        dialog = open_options(page, home_assistant)
        choose_model(dialog, UNOBTAINABLE_MODEL, listed=False)
        error = dialog.get_by_text(f"{UNOBTAINABLE_MODEL} cannot be had")
        error.wait_for(timeout=60_000)
        assert error.is_visible()
        shoot(page, artifacts_dir, "options-load-failed")
        # Back at the form, which shows the model the server kept.
        dialog.get_by_label("Model", exact=True).get_by_text(str(before), exact=True).wait_for()

    status = wait_for_status(e2e_server, lambda status: status["target"] is None, timeout=5)
    assert (status["state"], serving(status), status["last_failure"]["model"]) == ("ready", before, UNOBTAINABLE_MODEL)

    with step("browser: device page after the failed load"):
        page.keyboard.press("Escape")
        open_device_page(page, home_assistant)
        sensor_shows(page, "Model state", "Ready").wait_for(timeout=DEVICE_PAGE_WITHIN_S * 1000)
        sensor_shows(page, "Loaded model", str(before)).wait_for()
        assert page.get_by_text("Failed", exact=True).count() == 0
        shoot(page, artifacts_dir, "device-page-after-failed-load")
