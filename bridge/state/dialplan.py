"""Just enough of Asterisk's extensions.conf to answer "does this context have this extension?" (sans-IO).

`provision asterisk` uses it to refuse a DID whose transfer target the dialplan cannot reach: Asterisk
itself would accept the dial and then drop the caller ("sent to invalid extension"). Understood: contexts
(``[name]``, template markers ``(+)``/``(!)``), ``exten =>`` lines with literal extensions and patterns
(``_X.``, ``_NXX``, ``[1-5]``, ``.``, ``!``), an extension's ``/callerid`` suffix, ``include =>`` between
contexts, ``#include``/``#tryinclude`` of other files, ``;`` comments (``\\;`` is a literal).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_SECTION = re.compile(r"^\[([^\]]+)\]")
_DIRECTIVE = re.compile(r"^(exten|include)\s*=>?\s*(.*)$", re.IGNORECASE)
_FILE_INCLUDE = re.compile(r'^#(?:try)?include\s+"?([^"]+?)"?\s*$', re.IGNORECASE)


@dataclass
class Context:
    extensions: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)


def _strip_comment(line: str) -> str:
    out = []
    escaped = False
    for char in line:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            out.append(char)
            escaped = True
        elif char == ";":
            break
        else:
            out.append(char)
    return "".join(out).strip()


def parse(text: str, read_include: Callable[[str], str | None] | None = None,
          contexts: dict[str, Context] | None = None, _depth: int = 0) -> dict[str, Context]:
    """Contexts of one extensions.conf text; ``read_include(name)`` returns an included file's text (or
    None when it does not exist), so the caller decides where files come from."""
    contexts = {} if contexts is None else contexts
    current: Context | None = None
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        included = _FILE_INCLUDE.match(line)
        if included:
            if read_include is not None and _depth < 8:
                sub = read_include(included.group(1).strip())
                if sub is not None:
                    parse(sub, read_include, contexts, _depth + 1)
            continue
        section = _SECTION.match(line)
        if section:
            current = contexts.setdefault(section.group(1).strip(), Context())
            continue
        directive = _DIRECTIVE.match(line)
        if directive is None or current is None:
            continue
        kind, rest = directive.group(1).lower(), directive.group(2).strip()
        if kind == "include":
            current.includes.append(rest.split(",")[0].strip())
        else:
            current.extensions.append(rest.split(",")[0].strip().split("/")[0])
    return contexts


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """An Asterisk extension pattern (without its leading ``_``) as a regular expression."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        upper = char.upper()
        if upper == "X":
            out.append("[0-9]")
        elif upper == "Z":
            out.append("[1-9]")
        elif upper == "N":
            out.append("[2-9]")
        elif char == ".":
            out.append(".+")
        elif char == "!":
            out.append(".*")
        elif char == "[":
            end = pattern.find("]", i)
            if end < 0:
                out.append(re.escape(char))
            else:
                out.append("[" + re.escape(pattern[i + 1:end]).replace("\\-", "-") + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def extension_matches(pattern: str, extension: str) -> bool:
    if pattern.startswith("_"):
        return _pattern_regex(pattern[1:]).match(extension) is not None
    return pattern == extension


def find(contexts: dict[str, Context], context: str, extension: str) -> bool:
    """Whether ``extension`` exists in ``context`` or a context it includes."""
    seen: set[str] = set()
    todo = [context]
    while todo:
        name = todo.pop()
        if name in seen or name not in contexts:
            continue
        seen.add(name)
        found = contexts[name]
        if any(extension_matches(p, extension) for p in found.extensions):
            return True
        todo.extend(found.includes)
    return False


def syntax_errors(text: str, name: str) -> list[str]:
    """Lines Asterisk's config parser (main/config.c) rejects or drops: a category without its closing
    ``]`` or template ``)`` makes it refuse the whole file on reload (keeping the old configuration, while
    the reload itself reports success); a line without ``=`` is skipped with a warning."""
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            close = line.find("]")
            if close < 0:
                problems.append(f"{name} line {number}: no closing ']'")
            elif "(" in line[close:] and ")" not in line[close:]:
                problems.append(f"{name} line {number}: no closing ')' after the category")
        elif "=" not in line:
            problems.append(f"{name} line {number}: no '=' (Asterisk skips the line)")
    return problems


def sections_of_type(text: str, kind: str) -> list[str]:
    """Names of the ``[name]`` sections with ``type=kind`` (pjsip.conf style), in file order."""
    found: list[str] = []
    current: str | None = None
    for raw in text.splitlines():
        line = _strip_comment(raw)
        section = _SECTION.match(line)
        if section:
            current = section.group(1).strip()
        elif current is not None and line.replace(" ", "").lower() == f"type={kind}" and current not in found:
            found.append(current)
    return found
