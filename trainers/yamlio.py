"""Reading user YAML (specs, configs, ``--set`` values) without surprises.

Every problem is a :class:`~trainers.errors.ConfigError` naming the file (or
``--set``), the position and the fix; nothing else escapes, whatever the bytes.

Policy (what is refused, and why):

- **Size**: at most :data:`MAX_BYTES` (1 MiB) per file, :data:`MAX_SET_CHARS` per
  ``--set`` value; only regular files (a FIFO or ``/dev/zero`` would hang or never end).
- **Encoding**: UTF-8, with or without a byte-order mark. UTF-16 and UTF-32 *with* a
  byte-order mark (what Windows editors and PowerShell's ``>`` write) are decoded, as the
  YAML spec allows. Anything else (Latin-1, Windows-1252, UTF-16 without a BOM, binary)
  is refused with the byte offset, line and column of the first bad byte and "save it
  as UTF-8". NUL bytes are refused the same way.
- **Anchors and aliases** (``&a`` / ``*a``) are allowed in files (the paper specs share
  a dataset block or a weight list between grid blocks with them) but bounded: the
  document, with every alias expanded, may hold at most :data:`MAX_EXPANDED_NODES`
  nodes, counted on the composed graph before anything is built (an 833-byte "billion
  laughs" file is refused in microseconds instead of expanding to gigabytes), and a
  recursive alias is refused. ``--set`` values may not use them. Merge keys (``<<:``)
  are refused.
- **Duplicate keys** are an error naming the key path and both line numbers (PyYAML
  silently keeps the last one).
- **Keys** must be strings: ``1:``, ``null:``, and the YAML 1.1 booleans ``yes:`` /
  ``no:`` / ``on:`` / ``off:`` (read as ``True``/``False``) are refused with "quote it".
- **Nesting** deeper than :data:`MAX_DEPTH` levels is refused (``[[[[...`` would
  otherwise exhaust Python's recursion limit).
- **Tags**: the safe loader only: ``!!python/...`` and unknown tags are errors.
- **Values** are otherwise YAML 1.1 as PyYAML's safe loader reads them; ``.nan`` and
  ``.inf`` are kept as floats so that the typed config can refuse them naming the field.
- The top level of a file must be a mapping (an empty file reads as ``{}``).
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from trainers.errors import ConfigError

MAX_BYTES = 1 << 20  # per file
MAX_SET_CHARS = 64 * 1024  # per --set value
MAX_DEPTH = 64  # nested mappings / lists
MAX_EXPANDED_NODES = 100_000  # a document with its aliases expanded (a paper spec: ~1,000)

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TAG_NAMES = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:binary": "binary data",
}
# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


class _RefusedConstruct(Exception):
    """Raised inside the composer; turned into a ConfigError with the source name."""

    def __init__(self, problem: str, hint: str):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing deep nesting (and, for ``--set`` values, anchors and
    aliases) while composing."""

    def __init__(self, stream, allow_aliases: bool = False):
        super().__init__(stream)
        self._depth = 0
        self._allow_aliases = allow_aliases

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if self._allow_aliases:
            pass
        elif isinstance(event, AliasEvent):
            raise _RefusedConstruct(f"line {line}: YAML aliases (*{event.anchor}) are not allowed.",
                                    "Write the value out in full instead of referring to an anchor.")
        elif isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise _RefusedConstruct(f"line {line}: YAML anchors (&{event.anchor}) are not allowed.",
                                    "Remove the anchor and write each value out in full.")
        if isinstance(event, CollectionStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _RefusedConstruct(f"line {line}: nested more than {MAX_DEPTH} levels deep.",
                                        "Flatten the structure; a spec needs a few levels at most.")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


# A plain `=` or `<<` used as a value is text (PyYAML has no constructor for these tags).
_Loader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)
_Loader.add_constructor(_MERGE_TAG, yaml.SafeLoader.construct_yaml_str)


def _expanded_size(root) -> int:
    """Nodes of the document with every alias expanded, counted on the composed graph
    (an alias is the anchored node itself, so shared nodes are counted once per use,
    without expanding anything); a recursive alias is refused."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = ([child for pair in node.value for child in pair] if isinstance(node, MappingNode)
                    else list(node.value) if isinstance(node, SequenceNode) else [])
        if children_done:
            in_progress.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > MAX_EXPANDED_NODES:
                line = node.start_mark.line + 1
                raise _RefusedConstruct(f"line {line}: with its aliases expanded the document holds more than "
                                        f"{MAX_EXPANDED_NODES:,} values.",
                                        "Use fewer nested aliases (a spec holds a few hundred values).")
            continue
        if key in in_progress:
            raise _RefusedConstruct(f"line {node.start_mark.line + 1}: a recursive alias (a value that "
                                    "contains itself).", "Remove the alias from inside its own anchor.")
        in_progress.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in in_progress:
                raise _RefusedConstruct(f"line {child.start_mark.line + 1}: a recursive alias (a value that "
                                        "contains itself).", "Remove the alias from inside its own anchor.")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _check_keys(node, path: str = "") -> None:
    """Keys are plain strings, none repeated in a mapping (walks the composed graph,
    each shared node once)."""
    stack = [(node, path)]
    visited: set[int] = set()
    while stack:
        current, where = stack.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if isinstance(current, SequenceNode):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(current.value))
            continue
        if not isinstance(current, MappingNode):
            continue
        seen: dict[str, int] = {}
        for key_node, value_node in current.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise _RefusedConstruct(f"line {line}: merge keys (<<) are not allowed.",
                                        "Write the merged keys out in full (or quote \"<<\" if "
                                        "you mean that name).")
            if not isinstance(key_node, ScalarNode):
                raise _RefusedConstruct(f"line {line}: a key{_at(where)} is a "
                                        f"{'list' if isinstance(key_node, SequenceNode) else 'mapping'}"
                                        ", not a name.", "Keys must be plain names such as `lr`.")
            if key_node.tag != _STR_TAG:
                what = _TAG_NAMES.get(key_node.tag, f"type {key_node.tag}")
                raise _RefusedConstruct(f"line {line}: key {key_node.value!r}{_at(where)} is read as "
                                        f"{what}, not a name.",
                                        f"Quote it (\"{key_node.value}\": ...) if you mean the name.")
            key = key_node.value
            full = f"{where}.{key}" if where else key
            if key in seen:
                raise _RefusedConstruct(f"duplicate key {full!r} on line {line} (first on line "
                                        f"{seen[key]}).", "Remove one of them; YAML keeps only one.")
            seen[key] = line
            stack.append((value_node, full))


def _at(where: str) -> str:
    return f" under {where!r}" if where else ""


def _compose_and_construct(text: str, *, allow_aliases: bool = False) -> Any:
    """The one document of ``text``; raises _RefusedConstruct or yaml.YAMLError."""
    loader = _Loader(text, allow_aliases=allow_aliases)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if allow_aliases:
            _expanded_size(node)
        _check_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: what`` from a PyYAML error, without its source snippet."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        char = f"#x{char:04X}" if isinstance(char, int) else repr(char)
        return f"character {char} at position {exc.position} is not allowed in YAML"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def decode_yaml_bytes(data: bytes, source: str) -> str:
    """Text of a YAML file's bytes (see the module's encoding policy)."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            body = data[len(bom):]
            try:
                return body.decode(codec)
            except UnicodeDecodeError as exc:
                raise ConfigError(source, f"starts with a {name} byte-order mark but byte offset "
                                  f"{exc.start + len(bom)} is not valid {name}.",
                                  "Save the file as UTF-8.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _line_column(data, exc.start)
        hint = "Save it as UTF-8."
        if len(data) >= 2 and (data[0] == 0 or data[1] == 0):
            hint = "It looks like UTF-16 without a byte-order mark; save it as UTF-8."
        raise ConfigError(source, f"is not UTF-8 text: byte 0x{data[exc.start]:02X} at byte offset "
                          f"{exc.start} (line {line}, column {column}) is not valid UTF-8 "
                          "(Latin-1 or Windows-1252?).", hint) from None
    nul = text.find("\0")
    if nul >= 0:
        offset = len(text[:nul].encode("utf-8"))
        line, column = _line_column(data, offset)
        hint = ("It looks like UTF-16 without a byte-order mark; save it as UTF-8."
                if nul < 2 else "Save it as UTF-8 text.")
        raise ConfigError(source, f"holds a NUL byte at byte offset {offset} (line {line}, "
                          f"column {column}): not a text file.", hint)
    return text


def _line_column(data: bytes, offset: int) -> tuple[int, int]:
    head = data[:offset]
    return head.count(b"\n") + 1, offset - (head.rfind(b"\n") + 1) + 1


def loads_yaml(text: str, source: str, *, top_level_mapping: bool = True) -> Any:
    """Parse YAML ``text`` (from ``source``, used in messages) under the module's policy.

    Returns a dict (``{}`` for an empty document) when ``top_level_mapping``.
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(source, f"is {len(text):,} characters long; the limit is "
                          f"{MAX_BYTES:,} (1 MiB).", "A spec or config is a few kilobytes; "
                          "check that this is the right file.")
    try:
        data = _compose_and_construct(text, allow_aliases=True)
    except _RefusedConstruct as exc:
        raise ConfigError(source, exc.problem, exc.hint) from None
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(source, f"{_yaml_problem(exc)}.",
                          "Only plain YAML values (text, numbers, lists, mappings) are allowed; "
                          "remove the tag.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {_yaml_problem(exc)}.",
                          "Fix the syntax at the position shown.") from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        # e.g. an integer of more than 4300 digits (Python's int limit)
        raise ConfigError(source, f"a value cannot be read ({_first_line(exc)[:200]}).",
                          "Check the numbers in the file.") from None
    if not top_level_mapping:
        return data
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, f"expected a mapping at the top level, got {type(data).__name__}.",
                          "Write `key: value` lines, e.g. `base: {...}` and `grid: {...}`.")
    return data


def load_yaml(path: str | os.PathLike, *, what: str = "spec") -> dict:
    """Read the YAML mapping in ``path`` (a ``what``: spec, config, ...); ConfigError names it."""
    path = Path(path)
    source = str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(source, "file not found.", f"Check the path of the {what}.") from None
    except OSError as exc:
        raise ConfigError(source, f"cannot be read ({exc.strerror or exc}).",
                          f"Check the path of the {what} and its permissions.") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(source, "is a folder, not a file.", f"Pass the {what}'s YAML file.")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(source, "is not a regular file (a pipe or a device).",
                          f"Save the {what} to a file and pass its path.")
    if info.st_size > MAX_BYTES:
        raise ConfigError(source, f"is {info.st_size:,} bytes; the limit for a {what} is "
                          f"{MAX_BYTES:,} bytes (1 MiB).",
                          f"A {what} is a few kilobytes; check that this is the right file.")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, f"cannot be read ({exc.strerror or exc}).",
                          "Check the file's permissions.") from None
    if len(data) > MAX_BYTES:  # grew since stat
        raise ConfigError(source, f"is over the {MAX_BYTES:,}-byte (1 MiB) limit for a {what}.")
    return loads_yaml(decode_yaml_bytes(data, source), source)


def parse_set_value(text: str, *, where: str = "--set") -> Any:
    """The value of ``--set key=value``, parsed as YAML under the same policy.

    An empty value is ``""``; text that is not valid YAML syntax (``a: b: c``) stays the
    string it is, as before; refused constructs (aliases, anchors, duplicate or
    non-string keys, deep nesting, control characters, over-long text) are ConfigErrors.
    """
    if not isinstance(text, str):
        raise ConfigError(where, f"expected text, got {type(text).__name__}.")
    if len(text) > MAX_SET_CHARS:
        raise ConfigError(where, f"the value is {len(text):,} characters long; the limit is "
                          f"{MAX_SET_CHARS:,}.", "Put large settings in the spec file instead.")
    if "\0" in text:
        raise ConfigError(where, f"the value {text[:40]!r} holds a NUL character.",
                          "Remove it.")
    if not text.strip():
        return ""
    try:
        return _compose_and_construct(text)
    except _RefusedConstruct as exc:
        raise ConfigError(where, f"value {text[:80]!r}: {exc.problem}", exc.hint) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(where, f"value {text[:80]!r}: {_yaml_problem(exc)}.",
                          "Remove the control characters.") from None
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(where, f"value {text[:80]!r}: {_yaml_problem(exc)}.",
                          "Only plain YAML values are allowed; remove the tag.") from None
    except yaml.YAMLError:
        return text
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        raise ConfigError(where, f"value {text[:80]!r} cannot be read ({_first_line(exc)[:200]}).",
                          "Check the number.") from None


def parse_set(item: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` → ``("a.b.c", value)``, the value read by :func:`parse_set_value`."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError("--set", f"{item!r} is not of the form key=value.",
                          "Example: --set train.batch_size=4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError("--set", f"{item!r} has an empty key.", "Example: --set optimizer.lr=0.01")
    return key, parse_set_value(raw, where=f"--set {key}")
