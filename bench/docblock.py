"""
A benchmark's table kept in a doc between two markers: each run replaces
what is between them (or, the first time, appends a section with them).
"""

from __future__ import annotations

import os


def write_block(path: str, name: str, text: str, heading: str) -> None:
    """
    Put C{text} between C{<!-- name:begin -->} and C{<!-- name:end -->} in
    C{path} (atomically); without the markers, append them under a new
    C{## heading}.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path) as f:
        doc = f.read()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(doc)
    os.replace(path + ".tmp", path)
