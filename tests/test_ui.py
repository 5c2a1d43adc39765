"""The Prefect UI in a real browser, as a new user meets it: `ospo serve`, the API auth string on first load, the
`ospo-round` form submitted as it comes (the demo preset), the finished run's Artifacts tab.

Playwright for Python drives Debian's `chromium` package (`apt-get install -y chromium`; .ci/run installs it when
it is missing), never a browser Playwright downloads. Each step's screenshot is saved in the test's temporary
folder. A missing browser or package fails the test, naming what to install (it is never skipped).
"""

import re
import shutil
import time

import pytest
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from test_deploy import serving, wait_final

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 300
# The demo's sub-categories the test removes in the form, keeping color1, 2D_spatial, numeracy2 and complex.
TRIMMED = ("color2", "shape1", "shape2", "texture1", "texture2", "3D_spatial", "numeracy1", "non-spatial")
STAGE_TABLES = ("prompts", "negatives", "dense", "images", "questions", "vqa", "pairs")


def chromium() -> str:
    """The path of Debian's chromium; a missing browser or Playwright fails the test, naming what to install."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -e '.[test]')")
    path = shutil.which("chromium")
    if path is None:
        missing.append("Debian's chromium browser (apt-get install -y chromium)")
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}")
    return path


def field(page, label: str):
    """A field of the run form by its label (the innermost one: a section's box contains its fields' labels)."""
    return page.locator(".p-label", has_text=f"{label} (Optional)").last


def finished_run(served):
    """The one run of the round deployment, once it is final (`wait_final`); a failed or crashed run fails the test
    with the server's log."""
    with served.client() as client:
        deployment = client.read_deployment_by_name("ospo-round/ospo-round")
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        (run,) = client.read_flow_runs(deployment_filter=only_this)  # created when the form was submitted
        run = wait_final(served, client, run.id, timeout=RUN_TIMEOUT_S)
    assert run.state.is_completed(), f"{run.state.name}:\n{served.log()}"
    return run


def test_a_round_started_from_the_form_shows_its_summary_tables_and_images(tmp_path):
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with serving(tmp_path) as served, sync_playwright() as playwright:
        address = served.api_url.removesuffix("/api")
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            # First load: the UI asks for the auth string that `ospo serve` printed.
            page.goto(f"{address}/deployments")
            page.get_by_placeholder("admin:pass").fill(served.auth_path.read_text().strip())
            page.get_by_role("button", name="Login").click()
            page.get_by_role("link", name="ospo-round", exact=True).first.click()
            page.screenshot(path=shots / "1-deployment.png")

            # The run form starts from the demo preset, every range in its field's description, one number field per
            # prompt quota. Trimmed here to four sub-categories of one prompt each (a test-sized round), by hand.
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            expect(field(page, "Max Len").locator("input")).to_have_value("2")  # the demo's, not the paper's None
            expect(field(page, "Cfg Weight")).to_contain_text("Range: >= 0, <= 50.")
            expect(field(page, "color1").locator("input")).to_have_value("667")
            expect(field(page, "preset")).to_contain_text("demo")
            sub_categories = field(page, "Sub Categories")
            for name in TRIMMED:
                sub_categories.locator(".p-tag", has_text=re.compile(f"^{name}$")).locator("button").click()
            field(page, "Max Len").locator("input").fill("1")
            page.screenshot(path=shots / "2-form.png")
            page.get_by_role("button", name="Submit").click()
            expect(page.get_by_text("scheduled to start").first).to_be_visible()

            # The run is named after its round id once it starts. Found through the API (the runs list pages and
            # filters on its own schedule) and opened at its own address, where the UI must show that name.
            flow_run = finished_run(served)
            round_id = flow_run.name
            assert re.fullmatch(r"round-\d{8}-\d{6}", round_id), round_id
            page.goto(f"{address}/runs/flow-run/{flow_run.id}")
            expect(page.get_by_text(round_id).first).to_be_visible()
            expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
            page.screenshot(path=shots / "3-finished.png")

            # The Artifacts tab opens on the round's summary, then each stage's artifacts.
            page.get_by_text("Artifacts", exact=True).click()
            artifacts = page.locator(".flow-run-artifacts")
            expect(artifacts).to_contain_text(f"{round_id}-prompts-samples")
            listed = artifacts.inner_text()
            assert listed.index(f"{round_id}-summary") < min(listed.index(f"{round_id}-{t}") for t in STAGE_TABLES)
            page.screenshot(path=shots / "4-artifacts.png")
            artifacts.screenshot(path=shots / "4-artifacts-tab.png")  # the tab alone (README's docs/ui-artifacts.png)

            # The summary shows the contact sheet and the training curves, as images the browser rendered.
            artifacts.get_by_text(f"{round_id}-summary", exact=True).click()
            expect(page.get_by_text(f"OSPO round {round_id}: finished")).to_be_visible()
            images = page.locator("img[src^='data:image/png;base64,']")
            expect(images).to_have_count(2)
            assert all(w > 0 for w in images.evaluate_all("images => images.map(i => i.naturalWidth)"))
            page.screenshot(path=shots / "5-summary.png", full_page=True)

            # A stage's samples table: its cells are filled (ids and prompts of the accepted rows first).
            page.go_back()
            page.get_by_text("Artifacts", exact=True).click()
            artifacts.get_by_text(f"{round_id}-prompts-samples", exact=True).click()
            first_row = page.locator("table tbody tr").first
            expect(first_row).to_contain_text(re.compile(r"\d{7}"))  # an item id
            cells = first_row.locator("td").all_inner_texts()
            assert cells and all(cell.strip() for cell in cells[:3]), cells
            page.screenshot(path=shots / "6-samples.png")
        except Exception:
            page.screenshot(path=shots / "failed.png")
            raise
        finally:
            browser.close()
