"""Turning charts into files: PNG (vl-convert, no browser), self-contained HTML, and PNG-as-markdown.

Dagster has no Vega-Lite metadata type, so the UI shows a chart as a markdown image whose source is a
base64 data URI (`png_markdown`); the wiring wraps it in `MetadataValue.md`.
"""

from __future__ import annotations

import base64
import struct

import altair as alt
import vl_convert

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the Vega-Lite version altair's specs are written for ("v6.4.1" -> "6.4"): vl-convert ships several
VEGALITE_VERSION = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


def to_png(chart: alt.TopLevelMixin, scale: float = 2) -> bytes:
    """PNG bytes of the chart; scale 2 gives crisp text on high-DPI screens."""
    if scale <= 0:
        raise ValueError(f"to_png(): scale must be > 0, got {scale}")
    return vl_convert.vegalite_to_png(chart.to_json(), vl_version=VEGALITE_VERSION, scale=scale)


def to_svg(chart: alt.TopLevelMixin) -> str:
    return vl_convert.vegalite_to_svg(chart.to_json(), vl_version=VEGALITE_VERSION)


def to_html(chart: alt.TopLevelMixin) -> str:
    """An HTML page with the interactive chart and the Vega JavaScript inlined: it opens offline."""
    return vl_convert.vegalite_to_html(chart.to_json(), vl_version=VEGALITE_VERSION, bundle=True)


def png_data_uri(png: bytes) -> str:
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("png_data_uri(): the bytes are not a PNG image (signature missing); pass to_png(chart)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_markdown(png: bytes, alt_text: str = "chart") -> str:
    """A markdown image embedding the PNG, e.g. for Dagster's MetadataValue.md."""
    cleaned = alt_text.replace("[", "(").replace("]", ")").replace("\n", " ")
    return f"![{cleaned}]({png_data_uri(png)})"


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels, read from the PNG header."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("png_size(): the bytes are not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)
