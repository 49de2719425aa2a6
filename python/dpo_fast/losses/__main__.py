"""``python -m dpo_fast.losses [README.md]``: print the README's loss table, or rewrite it in the given file.

The table is rendered from the registry (:func:`dpo_fast.losses.registry.render_markdown_table`); in the README
it sits between the ``<!-- loss-table: ... -->`` and ``<!-- /loss-table -->`` markers.
"""

from __future__ import annotations

import pathlib
import sys

from .registry import render_markdown_table


def main(argv: list[str]) -> int:
    table = render_markdown_table()
    if not argv:
        sys.stdout.write(table)
        return 0
    path = pathlib.Path(argv[0])
    text = path.read_text(encoding="utf-8")
    begin, end = "<!-- loss-table:", "<!-- /loss-table -->"
    if begin not in text or end not in text:
        print(f"{path}: no {begin} ... {end} markers", file=sys.stderr)
        return 1
    start = text.index("\n", text.index(begin)) + 1
    path.write_text(text[:start] + table + text[text.index(end):], encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
