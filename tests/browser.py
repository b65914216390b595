"""A real headless browser for tests: screenshots and rendered DOMs of pages, and a not-blank check.

Debian's `chromium` (`apt-get install -y chromium`) or any Chrome/Chromium named by $CHROME or
found on PATH. Tests call `browser()` first: it skips them, saying why, where none is installed.
`render` loads a page once and returns its DOM, with a screenshot when asked; `assert_not_blank`
checks a screenshot. Pages get a virtual time budget, so a single-page app (the MLflow UI) has
run its scripts and fetched its data before the DOM is dumped and the picture taken.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = "install Debian's chromium (apt-get install -y chromium) or set $CHROME to a Chrome binary"


def find_browser() -> str | None:
    """$CHROME, else the first Chrome/Chromium on PATH; None when there is none."""
    if os.environ.get("CHROME"):
        return shutil.which(os.environ["CHROME"])
    return next((path for path in map(shutil.which, NAMES) if path), None)


def browser() -> str:
    """The browser's path; skips the calling test, with the reason, when there is none."""
    path = find_browser()
    if path is None:
        pytest.skip(f"no headless browser found ({', '.join(NAMES)} not on PATH, $CHROME unset): {INSTALL_HINT}")
    return path


def _url(target: str | os.PathLike) -> str:
    text = str(target)
    return text if "://" in text or text.startswith("data:") else Path(text).resolve().as_uri()


def _chromium(args: list[str], target: str | os.PathLike, wait_ms: int, timeout_s: float) -> str:
    """Run the browser headless on `target` (a URL or a file); return its stdout."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        argv = [
            browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", "--mute-audio", f"--user-data-dir={profile}",
            f"--virtual-time-budget={wait_ms}", *args, _url(target),
        ]  # fmt: skip
        # Its own process group: a browser past its time is killed with its renderer processes.
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as proc:  # fmt: skip
            try:
                out, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise RuntimeError(f"{argv[0]} took over {timeout_s:.0f} s on {target}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode} on {target}:\n{err[-2000:]}")
    return out


def render(target: str | os.PathLike, png: str | os.PathLike | None = None, *, size: tuple[int, int] = (1400, 1000),
           wait_ms: int = 10_000, timeout_s: float = 120) -> str:
    """The DOM of a URL or file as HTML after `wait_ms` of page time; with `png`, a `size`
    (width, height) screenshot of it too, from the same load."""
    args = ["--dump-dom", f"--window-size={size[0]},{size[1]}"]
    if png is not None:
        png = Path(png).resolve()
        png.parent.mkdir(parents=True, exist_ok=True)
        png.unlink(missing_ok=True)
        args.append(f"--screenshot={png}")
    dom = _chromium(args, target, wait_ms, timeout_s)
    if png is not None and not png.is_file():
        raise RuntimeError(f"the browser wrote no screenshot of {target} to {png}")
    return dom


def screenshot(target: str | os.PathLike, png: str | os.PathLike, **options) -> Path:
    """A PNG of a URL or file (options as `render`'s); returns its path."""
    render(target, png, **options)
    return Path(png).resolve()


def blank_reason(png: str | os.PathLike, *, min_colours: int = 16, min_std: float = 3.0) -> str | None:
    """Why a picture looks blank (too few distinct colours, too little pixel variation); None if it is not."""
    from PIL import Image, ImageStat

    with Image.open(png) as img:
        rgb = img.convert("RGB")
    colours = len(rgb.getcolors(maxcolors=1 << 24) or ())
    std = max(ImageStat.Stat(rgb).stddev)
    if colours < min_colours:
        return f"{png}: only {colours} distinct colours (< {min_colours})"
    if std < min_std:
        return f"{png}: pixel standard deviation {std:.1f} (< {min_std})"
    return None


def assert_not_blank(png: str | os.PathLike, **limits) -> None:
    reason = blank_reason(png, **limits)
    assert reason is None, reason
