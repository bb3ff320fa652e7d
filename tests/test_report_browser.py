"""The HTML report in a real browser: headless Chromium renders it and decodes every image.

Needs ``chromium`` (Debian package ``chromium``).  Without it the test is skipped,
except under CI (environment variable ``CI`` set), where CI installs it and a missing
browser is a failure.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline import report
from tests.test_report import _metrics, inputs  # noqa: F401 - ``inputs`` is a fixture

WIDTH, HEIGHT = 1280, 4000
TIMEOUT_S = 45

#: Runs after the load event (all data-URI images fetched and decoded) and writes the
#: result in the title, which ``--dump-dom`` prints.  Only the test copy has it: the
#: shipped report has no script.
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var overflow = document.documentElement.scrollWidth > window.innerWidth ? 1 : 0;
  document.title = "probe n=" + imgs.length + " broken=" + broken.length +
                   " overflow=" + overflow;
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture
def chromium():
    path = _chromium()
    if path is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return path


def _run(chromium, tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={WIDTH},{HEIGHT}", *args]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=str(tmp_path))


def test_report_renders_in_chromium(chromium, inputs, tmp_path):  # noqa: F811
    html = report.write_report(tmp_path / "report" / "sub-philips01_report.html",
                               metrics=_metrics(), **inputs)
    text = html.read_text(encoding="utf-8")
    n_images = len(re.findall(r"<img\s", text))
    assert n_images >= 9
    assert "<script" not in text.lower()

    # 1. Screenshot of the report as shipped (it has no script; see the assert above).
    png = tmp_path / "report.png"
    result = _run(chromium, tmp_path, f"--screenshot={png}", html.as_uri())
    assert png.is_file() and png.stat().st_size > 10_000, result.stderr[-2000:]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    pixels = imread(str(png))[..., :3]
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert pixels.std() > 0.05  # not blank
    assert (pixels < 0.9).any(axis=-1).mean() > 0.05  # a fair amount of non-white content
    # The red "research use only" banner is drawn near the top (the inline CSS applied).
    top = pixels[:600]
    banner = (np.abs(top - np.array([0xB3, 0x26, 0x1E]) / 255).max(axis=-1) < 0.06)
    assert banner.sum() > 2000
    # Figures with dark (FA) backgrounds and colour-FA colours made it to the screen.
    assert ((pixels < 0.05).all(axis=-1)).sum() > 20_000

    # 2. Every <img> decodes: a copy with a probe script, dumped after the load event.
    probe = tmp_path / "report_probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = _run(chromium, tmp_path, "--virtual-time-budget=10000", "--dump-dom",
                  probe.as_uri())
    title = re.search(r"<title>(probe[^<]*)</title>", result.stdout)
    assert title, (result.stdout[:500], result.stderr[-2000:])
    assert title.group(1) == f"probe n={n_images} broken=0 overflow=0"
    assert "Uncaught" not in result.stderr
