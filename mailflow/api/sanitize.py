"""HTML mail made safe to show: an allow-list sanitiser (stdlib `html.parser`).

The webmail shows the result inside ``<iframe sandbox srcdoc>`` (no scripts, a
unique origin) under a page CSP that blocks remote loads: this is the first of
those three walls, not the only one.

* Elements not on the allow-list are dropped; for ``script``, ``style``,
  ``iframe``, ``object``, ``embed``, ``template``, ``noscript``, ``svg``, ``math``,
  ``head``, ``title``, ``textarea``, ``select`` the content goes too, for the rest
  (``html``, ``body``, ``font``, unknown tags...) the text inside is kept.
* Attributes not on the allow-list are dropped: every ``on*`` handler, ``style``
  (it can load remote images through ``url()``), ``srcset``, ``formaction``...
* Remote resources are not loaded: an ``img`` keeps only a ``data:image/`` or
  ``cid:`` source; other sources are removed and noted in ``data-blocked-src``
  (``blocked`` counts them). Links keep ``http``, ``https`` and ``mailto`` targets
  and open in a new tab without referrer; ``javascript:`` and the like go.
"""

from __future__ import annotations

import re
from html import escape
from html.parser import HTMLParser

ALLOWED = {
    "a", "abbr", "b", "blockquote", "br", "caption", "center", "cite", "code", "col", "colgroup",
    "dd", "del", "details", "dfn", "div", "dl", "dt", "em", "figcaption", "figure", "h1", "h2",
    "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q",
    "s", "samp", "small", "span", "strike", "strong", "sub", "summary", "sup", "table", "tbody",
    "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul", "var",
}
DROP_WITH_CONTENT = {"script", "style", "iframe", "frame", "frameset", "object", "embed", "applet",
                     "template", "noscript", "noembed", "noframes", "svg", "math", "head", "title",
                     "textarea", "select", "xmp", "plaintext", "audio", "video", "canvas"}
VOID = {"br", "col", "hr", "img"}
ATTRS = {"align", "alt", "bgcolor", "border", "cellpadding", "cellspacing", "color", "colspan",
         "dir", "height", "href", "lang", "rowspan", "src", "title", "valign", "width", "start",
         "type", "open"}
_SAFE_HREF = re.compile(r"^(https?:|mailto:|#)", re.I)
_SAFE_IMG = re.compile(r"^(data:image/(png|gif|jpe?g|webp);|cid:)", re.I)
_CTRL = re.compile(r"[\x00-\x20\x7f]+")


class _Sanitiser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0  # depth inside a dropped-with-content element
        self.skip_tag: list[str] = []
        self.open: list[str] = []
        self.blocked = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        tag = tag.lower()
        if self.skip:
            if tag in DROP_WITH_CONTENT and tag not in VOID:
                self.skip_tag.append(tag)
                self.skip += 1
            return
        if tag in DROP_WITH_CONTENT:
            self.skip, self.skip_tag = 1, [tag]
            return
        if tag not in ALLOWED:
            return
        kept = []
        for name, value in attrs:
            name = name.lower()
            value = value or ""
            if name not in ATTRS:
                continue
            plain = _CTRL.sub("", value)
            if name == "href":
                if tag != "a" or not _SAFE_HREF.match(plain):
                    continue
            elif name == "src":
                if tag != "img":
                    continue
                if not _SAFE_IMG.match(plain):
                    self.blocked += 1
                    kept.append(("data-blocked-src", value))
                    continue
            kept.append((name, value))
        if tag == "a" and any(n == "href" for n, _ in kept):
            kept += [("target", "_blank"), ("rel", "noopener noreferrer")]
        attr_text = "".join(f' {n}="{escape(v, quote=True)}"' for n, v in kept)
        self.out.append(f"<{tag}{attr_text}>")
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag.lower() not in VOID and not self.skip and self.open and self.open[-1] == tag.lower():
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        tag = tag.lower()
        if self.skip:
            if tag == self.skip_tag[-1]:
                self.skip_tag.pop()
                self.skip -= 1
            return
        if tag in self.open:
            while self.open:
                t = self.open.pop()
                self.out.append(f"</{t}>")
                if t == tag:
                    break

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(escape(data, quote=False))

    def close_all(self) -> str:
        self.close()
        while self.open:
            self.out.append(f"</{self.open.pop()}>")
        return "".join(self.out)


def sanitize_html(html: str) -> tuple[str, int]:
    """(safe HTML fragment, number of remote resources blocked)."""
    p = _Sanitiser()
    p.feed(html)
    return p.close_all(), p.blocked
