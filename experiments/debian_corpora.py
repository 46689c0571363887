"""Two real corpora that are not the CPython stdlib, from Debian packages, split deterministically.

* ``pydoc``: the Python 3.11 documentation's reST sources (``apt-get install python3.11-doc``:
  ``/usr/share/doc/python3.11/html/_sources/**/*.txt``), 10 % of the files held out;
* ``handbook``: The Debian Administrator's Handbook, English prose (``apt-get download
  debian-handbook`` then ``dpkg -x``: ``usr/share/doc/debian-handbook/html/en-US/*.html``), each
  page's body text (no scripts, styles or head), 1/8 of the pages held out.

A file is held out when ``knnlm.corpora.hash_key`` of its relative name is 0 modulo the split's
modulus (the stdlib split's rule); both lists are ordered by that key, so ``--max-tokens`` takes a
uniform sample of files. Writes ``OUT/train.txt`` and ``OUT/test.txt`` (absolute paths, one per
line) and, for the handbook, the text files under ``OUT/txt``::

    python -m experiments.debian_corpora pydoc --out runs/pydoc
    python -m experiments.debian_corpora handbook --root /tmp/dh --out runs/handbook
    knnlm build-index --data $(cat runs/pydoc/train.txt) --max-tokens 100000 --out runs/pydoc/ds
    knnlm tune --datastore runs/pydoc/ds            # self-tuning: no tuning split
    knnlm eval --datastore runs/pydoc/ds --data $(cat runs/pydoc/test.txt) --max-tokens 20000
"""

from __future__ import annotations

import argparse
import html.parser
import re
import sys
from pathlib import Path

from knnlm.corpora import hash_key, hash_split

PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
HANDBOOK = Path("usr/share/doc/debian-handbook/html/en-US")


class _BodyText(html.parser.HTMLParser):
    """The text of an HTML page's body, block elements on lines of their own."""
    BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "pre", "tr", "br", "dt", "dd", "table", "section"}
    SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__()
        self.out: list[str] = []
        self.skip = 0
        self.body = False

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        self.body |= tag == "body"
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in self.SKIP
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip and self.body:
            self.out.append(data)


def html_text(page: str) -> str:
    p = _BodyText()
    p.feed(page)
    text = re.sub(r"[ \t]+\n", "\n", "".join(p.out))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _write(out: Path, files: list[Path], root: Path, modulus: int) -> tuple[int, int]:
    names = sorted((str(f.relative_to(root)) for f in files), key=hash_key)
    train, test = hash_split(names, modulus)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("".join(f"{root / n}\n" for n in train))
    (out / "test.txt").write_text("".join(f"{root / n}\n" for n in test))
    return len(train), len(test)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", choices=["pydoc", "handbook"])
    p.add_argument("--root", type=Path, default=None,
                   help="pydoc: the _sources directory; handbook: where the .deb was unpacked (dpkg -x)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.corpus == "pydoc":
        root = args.root or PYDOC
        files = sorted(root.rglob("*.txt"))
        modulus = 10
    else:
        if args.root is None:
            p.error("handbook: --root is where debian-handbook's .deb was unpacked (dpkg -x DEB ROOT)")
        root = args.out.resolve() / "txt"
        root.mkdir(parents=True, exist_ok=True)
        files = []
        for page in sorted((args.root / HANDBOOK).glob("*.html")):
            text = html_text(page.read_text(encoding="utf-8", errors="replace"))
            if len(text) > 200:
                (root / f"{page.stem}.txt").write_text(text)
                files.append(root / f"{page.stem}.txt")
        modulus = 8
    if not files:
        p.error(f"no files under {root}")
    n_train, n_test = _write(args.out, files, root, modulus)
    print(f"{args.corpus}: {n_train} train files, {n_test} held out -> {args.out}/train.txt, {args.out}/test.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
