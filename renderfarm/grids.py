"""Drawing a plot's grid (Pillow): cells in rows and columns, labelled like A1111's X/Y/Z plot.

Column labels (the X values) are on top, row labels (the Y values) at the left, each
``field: value`` (A1111's ``draw_grid_annotations``); a Z value, when the plot has one, is a
title line above the grid. A cell whose job did not succeed is drawn as a grey box crossed in
red, with its state (``failed``, ``cancelled``) written in it. Cells of different sizes (a
size axis) are centred in cells as large as the largest.

The layout (``GridLayout``) is returned with the image, so the caller can store it in the
PNG's JSON chunk and a reader can cut the cells back out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFont

PAD = 4  # pixels around label text
BACKGROUND = "white"
TEXT = "black"
MISSING_FILL = (200, 200, 200)
MISSING_MARK = (200, 30, 30)


@dataclass(frozen=True)
class GridLayout:
    """Where things are in a grid image: cell ``(col, row)`` is the box from
    ``(left + col * cell_width, top + row * cell_height)``, ``cell_width x cell_height``."""

    cols: int
    rows: int
    cell_width: int
    cell_height: int
    left: int  #: width of the row-label band (0 without row labels)
    top: int  #: height of the title and column-label bands
    width: int
    height: int

    def box(self, col: int, row: int) -> tuple[int, int, int, int]:
        x = self.left + col * self.cell_width
        y = self.top + row * self.cell_height
        return x, y, x + self.cell_width, y + self.cell_height

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def font_for(cell_height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, sized to the cells (at least 10 px: tiny test cells stay
    readable); the bitmap default where Pillow has no FreeType."""
    size = max(10, min(48, cell_height // 16))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width``, broken at spaces; a word wider than that
    (a tag-style prompt ``a,b,c``, a URL, Chinese or Japanese text) is cut between characters
    (else a row label would widen its band to its whole length, a column label cover its
    neighbours)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            *full, line = _cut(draw, word, font, width)
            lines.extend(full)
        lines.append(line)
    return lines


def _cut(draw: ImageDraw.ImageDraw, word: str, font, width: int) -> list[str]:
    """``word`` in pieces no wider than ``width`` (one character at least, however wide)."""
    pieces, piece = [], ""
    for char in word:
        if piece and draw.textlength(piece + char, font=font) > width:
            pieces.append(piece)
            piece = char
        else:
            piece += char
    return [*pieces, piece]


def draw_grid(
    cells: list[list[Image.Image | str]],
    col_labels: list[str],
    row_labels: list[str],
    title: str = "",
) -> tuple[Image.Image, GridLayout]:
    """The grid of ``cells[row][col]``: an image, or a string for a cell without one (its
    state, drawn crossed out). ``col_labels`` / ``row_labels`` may be empty (no such axis)."""
    rows, cols = len(cells), len(cells[0])
    images = [c for row in cells for c in row if isinstance(c, Image.Image)]
    cell_w = max((im.width for im in images), default=64)
    cell_h = max((im.height for im in images), default=64)
    font = font_for(cell_h)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _line_height(scratch, font)

    col_lines = [_wrap(scratch, t, font, cell_w - 2 * PAD) for t in col_labels]
    left_max = max(cell_w, 96)  # row labels wrap within this, as A1111's 3/4 of a cell
    row_lines = [_wrap(scratch, t, font, left_max - 2 * PAD) for t in row_labels]
    left = 0
    if row_labels:
        widest = max(scratch.textlength(line, font=font) for lines in row_lines for line in lines)
        left = int(widest) + 2 * PAD + 1
    title_lines = _wrap(scratch, title, font, max(cell_w * cols + left, 64) - 2 * PAD) \
        if title else []
    title_h = len(title_lines) * line_h + 2 * PAD if title_lines else 0
    labels_h = max((len(lines) for lines in col_lines), default=0) * line_h
    top = title_h + (labels_h + 2 * PAD if col_labels else 0)
    layout = GridLayout(cols, rows, cell_w, cell_h, left, top,
                        left + cols * cell_w, top + rows * cell_h)

    grid = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), line, fill=TEXT, font=font)
    for col, lines in enumerate(col_lines):
        x0, _, x1, _ = layout.box(col, 0)
        block = len(lines) * line_h
        y = title_h + PAD + (labels_h - block)  # bottom-aligned, just above the cells
        for i, line in enumerate(lines):
            w = draw.textlength(line, font=font)
            draw.text((x0 + (x1 - x0 - w) / 2, y + i * line_h), line, fill=TEXT, font=font)
    for row, lines in enumerate(row_lines):
        _, y0, _, y1 = layout.box(0, row)
        y = y0 + (y1 - y0 - len(lines) * line_h) / 2
        for i, line in enumerate(lines):
            w = draw.textlength(line, font=font)
            draw.text((left - PAD - w, y + i * line_h), line, fill=TEXT, font=font)
    for row, cells_of_row in enumerate(cells):
        for col, cell in enumerate(cells_of_row):
            box = layout.box(col, row)
            if isinstance(cell, Image.Image):
                x = box[0] + (cell_w - cell.width) // 2
                y = box[1] + (cell_h - cell.height) // 2
                grid.paste(cell.convert("RGB"), (x, y))
            else:
                _missing(draw, box, cell, font, line_h)
    return grid, layout


def _missing(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font,
             line_h: int) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=MISSING_FILL)
    draw.line((x0, y0, x1 - 1, y1 - 1), fill=MISSING_MARK, width=2)
    draw.line((x0, y1 - 1, x1 - 1, y0), fill=MISSING_MARK, width=2)
    lines = _wrap(draw, text, font, x1 - x0 - 2 * PAD)
    y = y0 + (y1 - y0 - len(lines) * line_h) / 2
    for i, line in enumerate(lines):
        w = draw.textlength(line, font=font)
        tx, ty = x0 + (x1 - x0 - w) / 2, y + i * line_h
        draw.rectangle((tx - 1, ty, tx + w + 1, ty + line_h - 1), fill=MISSING_FILL)
        draw.text((tx, ty), line, fill=TEXT, font=font)


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag|", font=font)
    return int(bottom) + 2
