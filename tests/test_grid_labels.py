"""Grid labels that do not break at spaces (a tag-style prompt "masterpiece,best_quality,...",
a URL, Chinese or Japanese text) still wrap within their band: they neither widen the row-label
band to the label's whole length nor run over the neighbouring columns."""

from __future__ import annotations

from PIL import Image, ImageDraw

from renderfarm.grids import PAD, _wrap, draw_grid, font_for

TAGS = "prompt_sr: " + ",".join(["masterpiece", "best_quality", "ultra_detailed"] * 20)


def test_an_unbroken_row_label_wraps_within_the_label_band():
    cells = [[Image.new("RGB", (64, 64), "red") for _ in range(2)] for _ in range(2)]
    grid, layout = draw_grid(cells, ["seed: 1", "seed: 2"], [TAGS, "prompt_sr: b"])
    assert layout.left <= 96 + 2 * PAD + 1
    assert grid.width == layout.left + 2 * 64


def test_every_wrapped_line_fits_its_width():
    font = font_for(64)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for text in (TAGS, "a photo of " + "猫" * 80, "x: https://example.com/" + "a" * 200):
        lines = _wrap(draw, text, font, 56)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
        assert all(draw.textlength(line, font=font) <= 56 for line in lines), lines
