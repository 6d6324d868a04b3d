"""Reading YAML as nodes, so that every problem can name its ``FILE:LINE``.

PyYAML's composer keeps the position of every node and does not merge duplicate
keys (the constructor silently keeps the last one); reading nodes lets us report
both. A :class:`Reader` walks one file: each method checks one value, records a
problem against the value's line when it is wrong, and returns ``None`` then, so
that the caller can go on and find the next problem. Pure code, no shell.
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Mapping, TypeVar

import yaml

from mutualbackup.inventory.model import Where
from mutualbackup.inventory.units import quote

T = TypeVar("T")

TAG = "tag:yaml.org,2002:"
_KNOWN_SCALAR_TAGS = {TAG + name for name in ("str", "int", "float", "bool", "null", "timestamp")}
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ×10 faster at a thousand members, same nodes
_KIND = {TAG + "int": "the integer", TAG + "float": "the number", TAG + "bool": "the yes/no value",
         TAG + "timestamp": "the date"}


def line_of(node: yaml.Node) -> int:
    """The 1-based line where ``node`` starts."""
    return node.start_mark.line + 1


def describe(node: yaml.Node) -> str:
    """What a node holds, for the ``got ...`` end of a message."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping (key: value lines)"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == TAG + "null":
        return "nothing" if node.value in ("", "~") else node.value
    if node.tag in _KIND:
        return f"{_KIND[node.tag]} {node.value}"
    return quote(node.value)


def load_file(path: str) -> tuple[yaml.Node | None, int, str]:
    """Compose the single YAML document in ``path``.

    In: a file path. Out: ``(node, 0, "")`` on success (node is None for an empty
    file) or ``(None, line, message)`` when the file cannot be read or parsed.
    Raises nothing.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return None, 1, "file not found"
    except OSError as exc:
        return None, 1, f"cannot read the file: {exc.strerror or exc}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, data[: exc.start].count(b"\n") + 1, "is not UTF-8 text (save the file as UTF-8)"
    try:
        return yaml.compose(text, Loader=_LOADER), 0, ""
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        detail = ", ".join(part for part in (exc.context, exc.problem) if part)
        return None, line, f"not valid YAML: {detail}"
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        return None, line, f"not valid YAML: character U+{exc.character:04X} is not allowed"
    except yaml.YAMLError as exc:
        return None, 1, f"not valid YAML: {exc}"
    except RecursionError:
        return None, 1, "not valid YAML for an inventory: lists or mappings are nested too deeply"


class Reader:
    """Checks the nodes of one file and collects ``(line, message)`` problems."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[tuple[int, str]] = []
        self._keys: dict[int, yaml.Node] = {}  # id(value node) -> its key node, for missing keys

    def error(self, node: yaml.Node | int, message: str) -> None:
        """Record ``message`` at ``node``'s line (or at a line number)."""
        line = node if isinstance(node, int) else line_of(node)
        self.problems.append((line, message))

    def where(self, node: yaml.Node) -> Where:
        return Where(self.file, line_of(node))

    def key_of(self, node: yaml.Node) -> yaml.Node:
        """The key under which ``node`` was read (``backup:`` for its mapping), else ``node`` itself."""
        return self._keys.get(id(node), node)

    def formatted(self) -> list[str]:
        """The problems as ``FILE:LINE: message``, in line order."""
        return [f"{self.file}:{line}: {message}" for line, message in sorted(self.problems, key=lambda p: p[0])]

    def mapping(
        self,
        node: yaml.Node,
        what: str,
        allowed: Iterable[str],
        required: Iterable[str] = (),
        hint: str = "",
        refused: Mapping[str, str] | None = None,
    ) -> dict[str, yaml.Node] | None:
        """The keys of a mapping node, each with its value node.

        ``what`` names the mapping in messages (``node "web1"``, ``backup``).
        Unknown, duplicate and missing keys are recorded (``hint`` ends the
        missing-key message; ``refused`` gives the message for particular keys
        that are not allowed here); the known keys that were read are returned.
        Returns None when ``node`` is not a mapping.
        """
        allowed = list(allowed)
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping of keys ({', '.join(allowed)}), got {describe(node)}")
            return None
        values: dict[str, yaml.Node] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, f"keys of {what} must be plain names, got {describe(key_node)}")
                continue
            key = key_node.value
            if key in first_line:
                self.error(
                    key_node,
                    f'duplicate key "{key}" in {what} (first at line {first_line[key]});'
                    " YAML would silently keep only the last one, so keep just one",
                )
                continue
            first_line[key] = line_of(key_node)
            if key_node.tag == TAG + "merge":
                self.error(key_node, f"merge keys (<<) are not supported in {what}; write the keys out")
            elif refused and key in refused:
                self.error(key_node, refused[key])
            elif key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                guess = f'did you mean "{close[0]}"? ' if close else ""
                self.error(
                    key_node, f"unknown key {quote(key)} in {what}; {guess}allowed keys: {', '.join(allowed)}"
                )
            else:
                values[key] = value_node
                self._keys[id(value_node)] = key_node
        missing = [f'"{key}"' for key in required if key not in first_line]
        if missing:
            keys = "key " + missing[0] if len(missing) == 1 else "keys " + ", ".join(missing)
            self.error(self.key_of(node), f"{what} is missing the required {keys}{hint}")
        return values

    def scalar(self, node: yaml.Node, label: str, expected: str) -> str | None:
        """The text of a non-null scalar as written (``web1``, ``2024``, ``/srv``).

        ``expected`` describes the value in the message when it is a list, a
        mapping, null or carries an explicit tag.
        """
        if not isinstance(node, yaml.ScalarNode) or node.tag == TAG + "null":
            self.error(node, f"{label} must be {expected}, got {describe(node)}")
            return None
        if node.tag not in _KNOWN_SCALAR_TAGS:
            self.error(node, f"{label}: YAML tags such as {node.tag} are not supported; write a plain value")
            return None
        return node.value

    def parsed(
        self, node: yaml.Node, label: str, expected: str, parse: Callable[[str], T], separator: str = ": "
    ) -> T | None:
        """``parse`` applied to a scalar's text; its ValueError becomes ``LABEL: message``.

        ``separator`` goes between label and message (``" "`` for ``host_key does not parse``).
        """
        text = self.scalar(node, label, expected)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            self.error(node, f"{label}{separator}{exc}")
            return None

    def integer(self, node: yaml.Node, label: str, low: int, high: int | None = None) -> int | None:
        """An integer scalar from ``low`` to ``high``; booleans and quoted numbers are refused."""
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
        if isinstance(node, yaml.ScalarNode) and node.tag == TAG + "int":
            value = _CONSTRUCTOR.construct_yaml_int(node)
            if value >= low and (high is None or value <= high):
                return value
        got = describe(node)
        if isinstance(node, yaml.ScalarNode) and node.tag == TAG + "str" and node.value.strip().isdigit():
            got += " (a quoted string: remove the quotes)"
        self.error(node, f"{label} must be {expected}, got {got}")
        return None

    def sequence(self, node: yaml.Node, label: str, example: str, non_empty: bool = False) -> list[yaml.Node] | None:
        """The items of a list node; refuses a single value and (optionally) an empty list."""
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{label} must be a list, like {example}; got {describe(node)}")
            return None
        if non_empty and not node.value:
            self.error(node, f"{label} must not be empty; list at least one, like {example}")
            return None
        return list(node.value)
