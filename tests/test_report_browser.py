"""The HTML report in a real headless browser (Debian's chromium): the verdict line and the embedded
plot are in the rendered DOM, and a screenshot of the page is not blank.

Skipped, with the reason, where /usr/bin/chromium is absent (`apt-get install -y chromium`)."""

from __future__ import annotations

import html
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from equiv.layerwise import run_layerwise
from equiv.report import write_reports
from equiv.report_wording import summary_line
from tests.fake_port import Defect, FakeConfig, FakeModel, FakeRunner

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no /usr/bin/chromium to render the HTML report in "
                                       "(install it with `apt-get install -y chromium`)")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A 3-layer fake with a planted defect at layers.1.mix, so a failing tap exists."""
    pytest.importorskip("matplotlib")
    cfg = FakeConfig(n_layers=3)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    result = run_layerwise(FakeModel(cfg, "float32", [Defect("layers.1.mix", 1e-4)]),
                           FakeRunner(cfg, "float32"), FakeRunner(cfg, "float64"), ids, None, seed=1)
    assert result.verdict == "divergent"
    out = tmp_path_factory.mktemp("browser")
    return result, write_reports(result, out / "report")["report.html"], out


def test_the_rendered_page_shows_the_verdict_and_the_plot(report):
    result, page, tmp_path = report
    run = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert "<h1>" in dom and "DIVERGENT" in dom
    summary = re.search(r'<p class="summary" id="summary">(.*?)</p>', dom, re.S)
    assert summary and html.unescape(summary.group(1)) == summary_line(result)
    assert summary_line(result).startswith("DIVERGENT: all 12 taps compared, ")
    img = re.search(r'<img class="plot" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert img and len(img.group(1)) > 10_000


def test_a_screenshot_of_the_page_is_not_blank(report):
    from PIL import Image

    _, page, tmp_path = report
    shot = tmp_path / "screenshot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, len(colours or [])
    # the verdict's red (#b00020) and the plot's failure markers are on screen
    pixels = np.asarray(image).astype(int)
    reddish = (pixels[..., 0] > 150) & (pixels[..., 1] < 70) & (pixels[..., 2] < 70)
    assert reddish.sum() > 500
