"""The inspect page in a real browser: Debian's headless Chromium loads it from disk (file://, no server), runs its
script, and the test reads the DOM (the marked span, the budget bars, the map, a hover), collects every console
error, exception and log error, and takes a screenshot. One browser for the module, a tab per page.

Skipped only where Chromium is not installed and CI is not set; `.ci/run` installs it and sets CI=true."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from tests.validate.chromium import Chromium, find_chromium
from tests.validate.test_inspect import MARK, MODEL, PROMPT, synthetic
from validate.inspection import run_inspect, write_inspect_dir


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but /usr/bin/chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("Chromium is not installed (apt-get install -y chromium); CI installs it and runs this test")
    chromium = Chromium(binary)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory, built_engine):
    """A real page (the reference's PyramidKV on the tiny model, a non-ASCII mark) and an 8k-token one."""
    root = tmp_path_factory.mktemp("inspect-pages")
    _, ref = built_engine(MODEL, "pyramidkv")
    d = run_inspect(ref, ref.tokenizer(PROMPT)["input_ids"], ref.policy, MODEL, ref.name, MARK)
    (root / "tiny").mkdir()
    write_inspect_dir(root / "tiny", d)
    (root / "long").mkdir()
    write_inspect_dir(root / "long", synthetic())
    return {"tiny": (root / "tiny" / "index.html", d), "long": (root / "long" / "index.html", synthetic())}


def check_screenshot(tab, path, width: int, height: int) -> None:
    png = tab.screenshot(path)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (width, height)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20, "the screenshot is (almost) blank"


def test_the_page_renders_the_mark_the_budgets_and_the_map(browser, pages, tmp_path):
    path, d = pages["tiny"]
    tab = browser.open(path)
    assert tab.eval("document.body.dataset.ready") == "1"  # the script ran to its end
    assert tab.eval("document.getElementById('mark').textContent") == MARK
    assert tab.eval("document.querySelectorAll('#mark .t').length") == d.mark.token_end - d.mark.token_start
    bars = tab.eval("Array.from(document.querySelectorAll('#budgets .budget')).map(b => "
                    "[+b.dataset.layer, b.querySelector('.bar').getBoundingClientRect().width])")
    assert [layer for layer, _ in bars] == list(range(d.num_layers))
    widths = [w for _, w in bars]
    assert all(w > 0 for w in widths) and widths[0] > widths[-1]  # PyramidKV: fewer tokens with depth
    verdict = tab.eval("Object.assign({}, document.getElementById('mark-verdict').dataset)")
    assert int(verdict["pairs"]) == d.num_layers * d.num_heads
    per = d.mark_heads()
    n = d.mark.token_end - d.mark.token_start
    assert int(verdict["whole"]) == sum(k == n for layer in per for k in layer)
    # The map: one column per position (a short prompt is not binned), some cells shaded, the strip drawn.
    size = tab.eval("[document.getElementById('map').width, document.getElementById('map').height]")
    assert size[0] >= d.prompt_len and size[1] > d.num_layers
    shaded = tab.eval("(() => { const c = document.getElementById('map'), g = c.getContext('2d');"
                      " const px = g.getImageData(0, 0, c.width, c.height).data; let n = 0;"
                      " for (let i = 0; i < px.length; i += 4) if (px[i] < 200 && px[i + 2] > 100) n++; return n; })()")
    assert shaded > 100
    # Hovering a token of the mark says who keeps it.
    tip = tab.eval("(() => { const t = document.querySelector('#mark .t');"
                   " t.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 50, clientY: 50}));"
                   " const tip = document.getElementById('tip'); return [tip.style.display, tip.textContent]; })()")
    assert tip[0] == "block" and f"position {d.mark.token_start} " in tip[1] and "(layer, head) pairs" in tip[1]
    assert tab.errors() == []
    check_screenshot(tab, tmp_path / "tiny.png", 1280, 1000)


def test_an_8k_token_page_loads_binned(browser, pages, tmp_path):
    path, d = pages["long"]
    tab = browser.open(path, height=900)
    assert tab.eval("document.body.dataset.ready") == "1"
    assert tab.eval("document.querySelectorAll('#prompt .t').length") == d.prompt_len
    assert tab.eval("document.getElementById('mark').textContent") == d.mark.text  # non-ASCII, bin-straddling
    columns = tab.eval("+document.getElementById('map').dataset.columns")
    assert columns == 1024 and tab.eval("document.getElementById('map').width") == 36 + columns
    assert tab.errors() == []
    check_screenshot(tab, tmp_path / "long.png", 1280, 900)
