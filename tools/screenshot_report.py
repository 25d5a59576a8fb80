#!/usr/bin/env python3
"""Render an HTML report to a PNG with headless Chromium, to check by eye how it looks.

    python tools/screenshot_report.py out/report.html report.png [--width 1280] [--height 2000]

Exits 0 when a non-trivial PNG was written; 2 when Chromium is missing (install the Debian
package ``chromium``, or pass ``--chromium PATH``); 1 when Chromium failed or wrote nothing
useful. Each run uses a fresh temporary profile and turns off every background network
feature, so it works offline and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")

# A blank 1280x2000 page compresses to a few kB; a rendered report with text and images is
# far larger. Below this the screenshot almost surely shows nothing.
MIN_PNG_BYTES = 10_000


def find_chromium(explicit: str | None) -> str | None:
    for name in (explicit,) if explicit else CANDIDATES:
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def screenshot(
    html_path: Path, png_path: Path, chromium: str, width: int, height: int, timeout: float
) -> None:
    """Run Chromium once; exits with a message when it fails or writes no file."""
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if png_path.exists():
        png_path.unlink()  # so a stale file cannot pass for this run's output
    with tempfile.TemporaryDirectory(prefix="clipad-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            html_path.as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: chromium did not finish within {timeout:.0f} s") from None
    if not png_path.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        msg = f"error: chromium exited {proc.returncode} and wrote no screenshot\n{tail}"
        print(msg, file=sys.stderr)
        raise SystemExit(1)


def check_png(png_path: Path, width: int, height: int) -> str:
    """Problems with the screenshot, or '' when it looks like a rendered page."""
    data = png_path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return f"{png_path} is not a PNG file"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if (w, h) != (width, height):
        return f"{png_path} is {w}x{h}, expected {width}x{height}"
    if len(data) < MIN_PNG_BYTES:
        return f"{png_path} is only {len(data)} bytes: the page probably rendered blank"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="report.html to render")
    parser.add_argument("png", type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--chromium", help="Chromium executable (default: search PATH)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    args = parser.parse_args(argv)

    if not args.html.is_file():
        print(f"error: '{args.html}' does not exist", file=sys.stderr)
        return 1
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            "error: Chromium not found (looked for "
            + (args.chromium or ", ".join(CANDIDATES))
            + "); install it, e.g. `apt-get install chromium`, or pass --chromium PATH",
            file=sys.stderr,
        )
        return 2
    screenshot(args.html.resolve(), args.png, chromium, args.width, args.height, args.timeout)
    problem = check_png(args.png, args.width, args.height)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"wrote {args.png} ({args.png.stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
