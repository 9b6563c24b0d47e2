"""The HTML report in a real browser (headless Chromium): it fits 1400 px, every image loads, both tables
are there. Skipped when Chromium is not installed (``apt-get install chromium``; `make test` tries).

Run as a script, it renews the committed screenshots: ``python tests/test_report_browser.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from depthprune.report.html import write_report

CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WIDTH = 1400

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium): "
                                "the report is not checked in a browser")

# Appended to a copy of the report: once everything has loaded, write the measurements into the page,
# where --dump-dom shows them.
MEASURE = """<script>
addEventListener("load", () => {
  const page = document.documentElement, box = id => document.getElementById(id);
  const out = document.createElement("pre");
  out.id = "measurements";
  out.textContent = JSON.stringify({
    scrollWidth: page.scrollWidth, clientWidth: page.clientWidth,
    images: [...document.images].map(i => i.naturalWidth),
    mainTable: box("main-table") && [box("main-table").parentElement.scrollWidth, box("main-table").parentElement.clientWidth],
    fullTableInDetails: !!document.querySelector("details #full-table"),
    csvLinks: [...document.querySelectorAll("a[href='results.csv'], a[href^='data:text/csv']")].length,
  });
  document.body.append(out);
});
</script>"""


def chromium(tmp: Path, *args: str, height: int = 900) -> str:
    profile = tmp / "chromium-profile"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}", *args],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def measure(report: Path, tmp: Path) -> dict:
    page = report.with_name("measured.html")
    page.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium(tmp, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="measurements">(.*?)</pre>', dom)
    assert found, "the measuring script did not run"
    return json.loads(found.group(1).replace("&amp;", "&"))


def example_copy(name: str, tmp: Path) -> Path:
    """The stored results of a committed example, in a scratch folder (its report is drawn there)."""
    copy = tmp / name
    copy.mkdir()
    shutil.copy(EXAMPLES / name / "results.sqlite", copy)
    shutil.copytree(EXAMPLES / name / "analysis", copy / "analysis")
    return copy


def screenshot(report: Path, tmp: Path, out: Path, height: int = 1700) -> Path:
    chromium(tmp, f"--screenshot={out}", report.as_uri(), height=height)
    return out


def png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


@pytest.mark.parametrize("source", ["synthetic", "smollm2-135m", "gemma3-270m"])
def test_report_in_a_browser(tmp_path, source):
    if source == "synthetic":
        from test_report import fake_sweep

        directory = tmp_path / "sweep"
        directory.mkdir()
        fake_sweep(directory)
    else:
        directory = example_copy(source, tmp_path)
    report = write_report(directory)
    m = measure(report, tmp_path)
    figures = report.read_text().count("<img ")  # accuracy, loss, retained, heatmap, ... as the sweep has data
    assert m["clientWidth"] > WIDTH - 50, "the window size did not apply: the width checks would mean nothing"
    assert m["scrollWidth"] <= m["clientWidth"], f"the page scrolls sideways at {WIDTH} px: {m}"
    assert figures >= 6 and len(m["images"]) == figures and min(m["images"]) > 0, \
        f"an image did not load: {m['images']} of {figures}"
    assert m["mainTable"] and m["mainTable"][0] <= m["mainTable"][1], f"the main table does not fit: {m['mainTable']}"
    assert m["fullTableInDetails"] and m["csvLinks"] == 2


def test_screenshot_is_1400_px_wide(tmp_path):
    from test_report import fake_sweep

    directory = tmp_path / "sweep"
    directory.mkdir()
    fake_sweep(directory)
    shot = screenshot(write_report(directory), tmp_path, tmp_path / "shot.png", height=600)
    assert png_size(shot) == (WIDTH, 600)


if __name__ == "__main__":  # renew examples/NAME/report/screenshot.png from the committed results (NAME...: those)
    import tempfile

    from PIL import Image

    if CHROMIUM is None:
        sys.exit("Chromium is not installed")
    for name in sys.argv[1:] or ("smollm2-135m", "gemma3-270m", "criteria-smollm2-135m", "criteria-gemma3-270m"):
        with tempfile.TemporaryDirectory() as scratch:
            tmp = Path(scratch)
            shot = screenshot(write_report(example_copy(name, tmp)), tmp, tmp / "shot.png")
            # 256 colours: text and flat plots lose nothing visible, the file shrinks threefold.
            Image.open(shot).convert("RGB").quantize(256).save(EXAMPLES / name / "report" / "screenshot.png", optimize=True)
        print(f"wrote {EXAMPLES / name / 'report' / 'screenshot.png'}")
