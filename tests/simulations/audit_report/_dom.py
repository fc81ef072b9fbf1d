"""Read a page's text and table rows by section id, with the standard library's HTML parser."""

from __future__ import annotations

from html.parser import HTMLParser

_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


class _Sections(HTMLParser):
    """Collects, for every element with an ``id``, its text and its table rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: dict[str, list[str]] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.ids_in_order: list[str] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, id)
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def _active(self) -> list[str]:
        return [i for _, i in self._open if i is not None]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            return
        ident = dict(attrs).get("id")
        if ident is not None:
            self.ids_in_order.append(ident)
            self.text.setdefault(ident, [])
            self.rows.setdefault(ident, [])
        self._open.append((tag, ident))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            for ident in self._active():
                self.rows[ident].append(self._row)
            self._row = None
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for ident in self._active():
            self.text[ident].append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Sections:
    parser = _Sections()
    parser.feed(page)
    parser.close()
    return parser


def section_text(page: str, ident: str) -> str:
    """The text of the element with ``id=ident``: its text nodes joined by one space."""
    sections = parse(page)
    assert ident in sections.text, f"no element with id {ident!r}"
    return " ".join(" ".join(sections.text[ident]).split())


def section_rows(page: str, ident: str) -> list[list[str]]:
    """Every table row (header rows too) inside the element with ``id=ident``."""
    sections = parse(page)
    assert ident in sections.rows, f"no element with id {ident!r}"
    return sections.rows[ident]
