"""Render a comparison report in headless Chromium and check that every plot decodes and shows.

    python -m jobs.check_report runs/compare_demo/report.html [--screenshot report.png]

A copy of the report gets a script that, once the page has loaded, records each image's decoded
size in the DOM; Chromium's ``--dump-dom`` prints that DOM. Exit status 0 when every ``<img>`` has a
non-zero natural size and the expected plots are present, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXPECTED_PLOTS = ("Reward–KL frontier", "Win rate vs temperature", "Reward vs compute")
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")
PROBE = """<script>window.addEventListener('load', () => {
  const seen = Array.from(document.images).map(i => [i.alt, i.naturalWidth, i.naturalHeight]);
  const out = document.createElement('pre'); out.id = 'rayalign-image-check';
  out.textContent = JSON.stringify(seen); document.body.appendChild(out);
});</script>"""


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _run(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)


def check_report(report: Path, screenshot: Path | None = None, browser: str | None = None) -> dict:
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless Chromium found (looked for {', '.join(BROWSERS)})")
    html = report.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report.html"
        probe.write_text(html.replace("</body>", PROBE + "</body>"))
        dom = _run(browser, "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'<pre id="rayalign-image-check">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError(f"{report}: the page did not finish loading in Chromium (no probe output)")
    images = [{"alt": alt, "width": w, "height": h} for alt, w, h in json.loads(found.group(1).replace("&quot;", '"'))]
    missing = [title for title in EXPECTED_PLOTS if title not in {i["alt"] for i in images}]
    broken = [i["alt"] for i in images if not (i["width"] > 0 and i["height"] > 0)]
    if screenshot is not None:
        _run(browser, f"--screenshot={screenshot}", "--window-size=1200,2400", report.resolve().as_uri())
    return {"report": str(report), "browser": browser, "images": images, "missing_plots": missing,
            "broken_images": broken, "ok": not missing and not broken and bool(images)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.check_report", description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args(argv)
    result = check_report(args.report, args.screenshot)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    from jobs.run.cli import guarded  # user errors as one line, like every driver

    sys.exit(guarded(main))
