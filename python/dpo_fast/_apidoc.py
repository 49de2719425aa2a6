"""Generate the signature blocks of docs/API.md from the code.

    python -m dpo_fast._apidoc docs/API.md           # rewrite the generated blocks in place
    python -m dpo_fast._apidoc docs/API.md --check   # exit 1 and print a diff when they are out of date

docs/API.md is hand-written prose around generated blocks. A block runs from ``<!-- apidoc: SECTION -->`` to
``<!-- /apidoc -->``; everything outside the markers is kept as written. Each section lists every public name
(``__all__``) of its modules — functions with their ``inspect.signature``, classes with their constructor and
their own public methods (``forward`` for modules), constants with their value — each under the first line of
its docstring. A name already listed in an earlier section (the same object under the same name, e.g.
``dpo_fast.pack_pairs`` and ``dpo_fast.packing.pack_pairs``) is listed once. tests/project/test_api_doc.py fails when a
regeneration would change the file: after changing a public signature, rerun the command above.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterator

WIDTH = 116
# section -> modules whose __all__ it lists (in order); the section's first module is its display prefix
SECTIONS: dict[str, tuple[str, ...]] = {
    "dpo_fast": ("dpo_fast",),
    "dpo_fast.packing": ("dpo_fast.packing",),
    "dpo_fast.reference": ("dpo_fast.reference",),
    "dpo_fast.hf": ("dpo_fast.hf",),
    "dpo_fast.distributed": ("dpo_fast.distributed",),
    "dpo_fast.integrations": ("dpo_fast.integrations", "dpo_fast.integrations.trl", "dpo_fast.integrations.trl_grpo",
                              "dpo_fast.integrations.trl_kto", "dpo_fast.integrations.trl_cpo_orpo",
                              "dpo_fast.integrations.padding_free"),
}
_SKIP = {"__version__"}
_BEGIN = re.compile(r"^<!-- apidoc: (\S+) -->$", re.M)
_END = "<!-- /apidoc -->"


# ------------------------------------------------------------------------------------------------ rendering

def _annotation(ann: Any) -> str:
    return ann if isinstance(ann, str) else inspect.formatannotation(ann)


def _default(value: Any) -> str:
    if inspect.isfunction(value) or inspect.isclass(value):
        return value.__qualname__
    text = repr(value)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # no addresses: the output must be the same on every run


def _params(sig: inspect.Signature) -> list[str]:
    """The parameters as ``inspect.Signature`` prints them, annotations unquoted, ``/`` and ``*`` included."""
    out: list[str] = []
    star_done = False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind == p.KEYWORD_ONLY and not star_done:
            out.append("*")
        if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY):
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += ": " + _annotation(p.annotation)
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _default(p.default)
        out.append(text)
        if p.kind == p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind != p.POSITIONAL_ONLY):
            out.append("/")
    return out


def _wrap_call(head: str, items: list[str], tail: str, indent: str = "", open_: str = "(", close: str = ")") -> list[str]:
    """``head(items...)tail`` on lines of at most WIDTH, continuation lines aligned after the bracket."""
    one = f"{indent}{head}{open_}{', '.join(items)}{close}{tail}"
    if len(one) <= WIDTH:
        return [one]
    hang = " " * (len(indent) + len(head) + 1)
    if len(hang) > 48:
        hang = indent + " " * 8
    lines, cur = [], f"{indent}{head}{open_}"
    for k, item in enumerate(items):
        piece = item + (", " if k + 1 < len(items) else close + tail)
        if cur.strip() and len(cur) + len(piece.rstrip()) > WIDTH and not cur.endswith(open_):
            lines.append(cur.rstrip())
            cur = hang
        cur += piece
    if not items:
        cur += close + tail
    lines.append(cur)
    return lines


def _signature_lines(head: str, sig: inspect.Signature, indent: str = "") -> list[str]:
    ret = "" if sig.return_annotation is sig.empty else " -> " + _annotation(sig.return_annotation)
    return _wrap_call(head, _params(sig), ret, indent)


def _summary(obj: Any) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def _comment(text: str, indent: str = "") -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(indent) + 2 + len(cur) + 1 + len(w) > WIDTH:
            lines.append(f"{indent}# {cur}")
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(f"{indent}# {cur}")
    return lines


def _public_name(cls: type) -> str:
    """``torch.nn.Module`` rather than ``torch.nn.modules.module.Module``: the shortest module path exporting it."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    parts = cls.__module__.split(".")
    for k in range(1, len(parts) + 1):
        mod = sys.modules.get(".".join(parts[:k]))
        if mod is not None and getattr(mod, cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:k])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "dpo_fast"


def _class_lines(head: str, cls: type) -> list[str]:
    foreign = [b for b in cls.__mro__[1:] if not _ours(b) and b is not object]
    kind = "exception" if issubclass(cls, BaseException) else "dataclass" if dataclasses.is_dataclass(cls) else "class"
    base = next((b for b in foreign if b.__module__ != "typing"), None)
    note = f"{kind} ({_public_name(base)})" if base is not None else kind
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - a class without an introspectable constructor
        sig = None
    lines = _signature_lines(head, sig) if sig is not None else [head]
    if len(lines) == 1 and len(lines[0]) + 5 + len(note) <= WIDTH:
        lines[0] += f"    # {note}"
    else:
        lines = [f"# {note}"] + lines
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    inherited = set().union(*(vars(b) for b in foreign)) if foreign else set()
    seen: set[str] = set()
    module_api = any(_public_name(b) == "torch.nn.Module" for b in foreign)
    for owner in cls.__mro__:
        if not _ours(owner):
            continue
        for name, attr in vars(owner).items():
            if name in seen or name in fields:
                continue
            public = not name.startswith("_") or name == "__call__"
            if not public or (name in inherited and name not in ("forward", "__call__")):
                continue
            if module_api and name != "forward":  # a torch module's interface is its constructor and forward
                continue
            seen.add(name)
            if isinstance(attr, property):
                ann = inspect.signature(attr.fget).return_annotation if attr.fget else inspect.Signature.empty
                text = f"    .{name}" + ("" if ann is inspect.Signature.empty else f": {_annotation(ann)}")
                lines.append(text + "    # property")
            elif isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
                fn = getattr(cls, name)
                sig = inspect.signature(fn)
                if inspect.isfunction(attr):  # drop self
                    sig = sig.replace(parameters=list(sig.parameters.values())[1:])
                prefix = "@classmethod " if isinstance(attr, classmethod) else "@staticmethod " if isinstance(
                    attr, staticmethod) else ""
                lines.extend(_signature_lines(f"{prefix}.{name}", sig, indent="    "))
    return lines


def _plain(value: Any) -> bool:
    """A constant whose repr is the same on every run: str/int/float/bool/None, possibly in tuples."""
    if isinstance(value, (tuple, list, frozenset, set)):
        return all(_plain(x) for x in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _entry(prefix: str, name: str, obj: Any) -> list[str]:
    head = f"{prefix}.{name}"
    if inspect.isclass(obj):
        body = _class_lines(head, obj)
    elif inspect.ismodule(obj):
        body = [f"{head}    # module"]
    elif callable(obj):
        body = _signature_lines(head, inspect.signature(obj))
    elif isinstance(obj, (tuple, list, frozenset, set)) and _plain(obj):
        items = [repr(x) for x in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
        brackets = {tuple: "()", list: "[]"}.get(type(obj), "{}")
        return _wrap_call(f"{head} = ", items, "", open_=brackets[0], close=brackets[1])
    else:
        return [f"{head} = {_default(obj)}"]
    summary = _summary(obj)
    return (_comment(summary) if summary else []) + body


def _entries(section: str, documented: set[tuple[str, int]]) -> Iterator[list[str]]:
    for module_name in SECTIONS[section]:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name in _SKIP:
                continue
            obj = getattr(module, name)
            key = (name, id(obj))
            if key in documented:
                continue
            documented.add(key)
            yield _entry(module_name, name, obj)


def render_section(section: str, documented: set[tuple[str, int]] | None = None) -> str:
    """The generated block of one section (between the markers, markers excluded)."""
    documented = set() if documented is None else documented
    blocks = ["\n".join(e) for e in _entries(section, documented)]
    return "```python\n" + "\n\n".join(blocks) + "\n```"


def regenerate(text: str) -> str:
    """``text`` (API.md) with every generated block rewritten from the code; the prose is kept as it is."""
    found = _BEGIN.findall(text)
    unknown = [s for s in found if s not in SECTIONS]
    missing = [s for s in SECTIONS if s not in found]
    if unknown or missing or len(set(found)) != len(found):
        raise ValueError(f"apidoc markers: unknown sections {unknown}, missing sections {missing}, "
                         f"sections {found} (each of {list(SECTIONS)} exactly once)")
    documented: set[tuple[str, int]] = set()
    out, pos = [], 0
    # rendered in SECTIONS order: a name exported in two places is listed under the earlier section
    rendered = {s: render_section(s, documented) for s in SECTIONS}
    for m in _BEGIN.finditer(text):
        end = text.find(_END, m.end())
        if end < 0:
            raise ValueError(f"apidoc: no {_END} after <!-- apidoc: {m.group(1)} -->")
        out.append(text[pos:m.end()])
        out.append("\n" + rendered[m.group(1)] + "\n")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpo_fast._apidoc", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default="docs/API.md")
    ap.add_argument("--check", action="store_true", help="only compare: exit 1 with a diff when out of date")
    args = ap.parse_args(argv)
    path = Path(args.path)
    old = path.read_text()
    new = regenerate(old)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path),
                                                       f"{path} (regenerated)"))
            print(f"\n{path} is out of date: run `python -m dpo_fast._apidoc {path}`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new)
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
