"""report.html in a real browser: headless Chromium loads every plot image, and a screenshot
of the page shows them. Skipped when Chromium is not installed (.ci/run installs Debian's
``chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import make_pipeline

from posttrain.report import build_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (.ci/run installs it)")

# Written into a copy of the page: after load, each image's natural size (0x0: it did not
# load) and the variance of its decoded pixels' luminance (0: blank), as attributes that
# --dump-dom then prints.
PROBE = """<script>
function variance(img) {
  var c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  var g = c.getContext("2d"); g.drawImage(img, 0, 0);
  var d = g.getImageData(0, 0, c.width, c.height).data, n = d.length / 4, s = 0, s2 = 0;
  for (var i = 0; i < d.length; i += 4) {
    var y = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]; s += y; s2 += y * y;
  }
  return s2 / n - (s / n) * (s / n);
}
window.addEventListener("load", function () {
  var im = document.images;
  for (var i = 0; i < im.length; i++) {
    var ok = im[i].complete && im[i].naturalWidth > 0;
    im[i].setAttribute("data-size", ok ? im[i].naturalWidth + "x" + im[i].naturalHeight : "0x0");
    im[i].setAttribute("data-var", ok ? variance(im[i]).toFixed(1) : "0");
  }
  document.body.setAttribute("data-images", String(im.length));
});
</script>"""


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to run as root with its sandbox (CI runs as root);
    # the proxy to a closed port makes any network fetch fail, so the page must not need one.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--proxy-server=http://127.0.0.1:9", f"--user-data-dir={profile}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    page = build_report(make_pipeline(tmp_path / "pipe"))
    pngs = sorted((page.parent / "plots").glob("*.png"))
    assert len(pngs) >= 15

    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                   probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'data-images="(\d+)"', dom.stdout).group(1) == str(len(pngs))
    sizes = re.findall(r'data-size="(\d+)x(\d+)"', dom.stdout)
    assert len(sizes) == len(pngs)
    with Image.open(pngs[0]) as im:
        want = im.size
    assert all((int(w), int(h)) == want for w, h in sizes), sizes  # every plot decoded
    variances = [float(v) for v in re.findall(r'data-var="([\d.]+)"', dom.stdout)]
    assert len(variances) == len(pngs) and min(variances) > 50, variances  # none blank

    shot = tmp_path / "screenshot.png"
    out = chromium(tmp_path / "profile", "--window-size=1400,2400", f"--screenshot={shot}",
                   page.as_uri())
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.shape[:2] == (2400, 1400)
    assert px.std() > 20, "the screenshot is blank"
    # the plots are on screen: matplotlib's first line colour (#1f77b4) on many pixels
    blue = (np.abs(px - [31, 119, 180]).max(axis=-1) < 30).sum()
    assert blue > 500, f"only {blue} plot-blue pixels: the plots did not render"
