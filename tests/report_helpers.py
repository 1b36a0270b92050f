"""Reading a generated report.html back (stdlib html.parser): sections, tables, images."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

VOID = {"img", "br", "meta", "link", "hr", "input"}

#: the built-in sections, in the order the page shows them (curves only with histories)
SECTIONS = ["summary", "pairs", "per-class", "matrix", "mistakes", "curves", "data"]


@dataclass
class Node:
    tag: str
    attrs: dict
    children: list = field(default_factory=list)
    text: str = ""

    def find_all(self, tag: str, **attrs) -> list[Node]:
        out = []
        for c in self.children:
            if c.tag == tag and all(c.attrs.get(k) == v for k, v in attrs.items()):
                out.append(c)
            out += c.find_all(tag, **attrs)
        return out

    def find(self, tag: str, **attrs) -> Node:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag} {attrs}>"
        return found[0]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(path: Path) -> Node:
    p = _Parser()
    p.feed(Path(path).read_text(encoding="utf-8"))
    return p.root


def section_ids(doc: Node) -> list[str]:
    return [s.attrs["id"] for s in doc.find_all("section")]


def table_rows(doc: Node, table_id: str) -> list[list[Node]]:
    """The data rows (those with <td>) of the table with that id, as lists of cells."""
    rows = doc.find("table", id=table_id).find_all("tr")
    return [r.find_all("td") for r in rows if r.find_all("td")]
