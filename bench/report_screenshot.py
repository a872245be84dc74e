"""Render a ``lowbit compare`` report in headless Chromium: a PNG screenshot, and a check that it loaded.

    python bench/report_screenshot.py REPORT_DIR/report.html [-o screenshot.png]

Chromium (Debian's package: ``apt-get install chromium``) runs twice on the page: once on a copy with a
small probe script appended, whose findings (images decoded or not, local links that lead nowhere, table
rows) the browser writes into the DOM that ``--dump-dom`` prints; once for the screenshot. Prints the
findings as JSON; exits 1 when an image did not decode or a link is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  const rows = document.querySelectorAll('#results tbody tr').length;
  const out = document.createElement('pre');
  out.id = 'lowbit-probe';
  out.textContent = JSON.stringify({images: imgs.length, broken_images: broken, links: links, rows: rows,
                                    title: document.title});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found (apt-get install chromium)")


def _run(args: list[str]) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             "--virtual-time-budget=5000"]
    done = subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def check_report(html: str | Path, screenshot: str | Path, width: int = 1280, height: int = 1500) -> dict[str, Any]:
    """Load ``html`` in headless Chromium; write ``screenshot``; return what the page holds."""
    page = Path(html).resolve()
    probe = page.parent / f".probe-{os.getpid()}.html"  # beside the page: relative links resolve the same
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        dom = _run(["--dump-dom", probe.as_uri()])
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'<pre id="lowbit-probe">(.*?)</pre>', dom, re.S)
    if m is None:
        raise RuntimeError("the page did not finish loading (no probe output in the DOM)")
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    found["broken_links"] = [h for h in found.pop("links") if not h.startswith(("http:", "https:", "#", "data:"))
                             and not (page.parent / h.split("#")[0]).exists()]
    shot = Path(screenshot).resolve()
    _run([f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri()])
    if not shot.exists() or shot.stat().st_size == 0:
        raise RuntimeError("chromium wrote no screenshot")
    found["screenshot"] = str(shot)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("-o", "--output", default=None, help="screenshot PNG (default: beside the page)")
    args = ap.parse_args()
    out = args.output or str(Path(args.html).with_name("screenshot.png"))
    found = check_report(args.html, out)
    print(json.dumps(found, indent=2))
    return 1 if found["broken_images"] or found["broken_links"] else 0


if __name__ == "__main__":
    sys.exit(main())
