"""Render a `selfinstruct stats` report.html in headless Chromium and save a PNG screenshot.

    python benchmarks/check_report_render.py outputs/run/report/report.html [--png shot.png]

Checks that the page is self-contained (no http(s) URLs in src/href attributes, every image inlined as
base64) and that Chromium renders it to a non-blank screenshot. Chromium is Debian's `chromium` package
(`apt-get install -y chromium`); with no network features it never reaches out, so this runs offline.
Exit code 0 on success, 1 with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_self_contained(html: str) -> list[str]:
    """Problems that would make the page depend on something outside the file."""
    problems = [
        f"external reference {m!r}" for m in re.findall(r"""(?:src|href)=["']((?:https?:)?//[^"']+)""", html)
    ]
    problems += [
        f"image not inlined: {m!r}" for m in re.findall(r"""<img[^>]+src=["'](?!data:)([^"']+)""", html)
    ]
    return problems


def screenshot(report: Path, png: Path, width: int = 1280, height: int = 2000, timeout: float = 120) -> None:
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found (Debian: apt-get install -y chromium)")
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png.resolve()}",
            f"--window-size={width},{height}",
            report.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): {tail}")


def is_blank(png: Path) -> bool:
    """True when every pixel has the same colour (a page that did not render)."""
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    return bool((pixels == pixels[0, 0]).all())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the report.html to render")
    parser.add_argument("--png", type=Path, help="screenshot path (default: report.png beside the report)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args()
    png = args.png or args.report.with_name("report.png")
    try:
        problems = check_self_contained(args.report.read_text(encoding="utf-8"))
        if problems:
            raise RuntimeError(f"{args.report} is not self-contained: {problems[0]}")
        screenshot(args.report, png, args.width, args.height)
        if is_blank(png):
            raise RuntimeError(f"{png} is blank: the page did not render")
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print(f"ok: {args.report} renders; screenshot {png} ({png.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
