"""Reading the files a job is made of (its YAML spec, a template file, the catalogue) with bounds, and
the one check every input reader passes (a name given twice). Why each bound: docs/decisions.md,
"Reading a job's files"."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import ValidationError

from runner.errors import UsageError
from runner.files import head

MAX_FILE_BYTES = 2_000_000  # a job spec, a template file, a catalogue file
MAX_YAML_DEPTH = 64  # mappings and lists inside each other
MAX_YAML_NODES = 200_000  # values in a document, counting each alias as the whole value it stands for
_SYSTEM_TREES = ("/proc", "/sys", "/dev")


def read_text_file(path: Path, where: str, name: str | None = None) -> str:
    """The UTF-8 text of a regular file of at most MAX_FILE_BYTES, never under /proc, /sys or /dev;
    otherwise UsageError `where: cannot read <name>: why` (`name`: what the file is, by default its path)."""
    prefix = f"{where}: cannot read {name or path}"
    real = os.path.realpath(path)
    for tree in _SYSTEM_TREES:
        if real == tree or real.startswith(tree + "/"):
            raise UsageError(f"{prefix}: {path} is a system file (under {tree}); name a text file of your own")
    try:
        _require_regular(os.stat(path), prefix)  # stat, then open non-blocking: a FIFO never blocks us
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UsageError(f"{prefix} ({describe_os_error(exc)})") from None
    try:
        _require_regular(os.fstat(fd), prefix)  # the file opened is the file checked
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise UsageError(f"{prefix}: it is over {MAX_FILE_BYTES:,} bytes; is it the right file?")
            chunks.append(chunk)
    except OSError as exc:
        raise UsageError(f"{prefix} ({describe_os_error(exc)})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{prefix}: it is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None


def _require_regular(info: os.stat_result, prefix: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{prefix}: it is a directory; name a file")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{prefix}: it is not a regular file (a pipe, socket or device); name a text file")
    if info.st_size > MAX_FILE_BYTES:
        raise UsageError(f"{prefix}: it is {info.st_size:,} bytes, over {MAX_FILE_BYTES:,}; is it the right file?")


def describe_os_error(exc: OSError) -> str:
    """An OSError in words a user can act on: ENAMETOOLONG is a name that is too long, not a permission."""
    if exc.errno == errno.ENAMETOOLONG:
        return "the file name is too long; use a shorter name"
    if exc.errno == errno.ENOENT:
        return "no such file"
    return exc.strerror or type(exc).__name__


def load_yaml(text: str, origin: str, *, text_if_unparsed: bool = False) -> Any:
    """Parse one YAML document with the bounded loader; UsageError `origin: invalid YAML ...` if it is
    not YAML or goes over a bound. `text_if_unparsed`: text that does not parse as YAML is returned as
    it is (a `--set` value), but a bound is still refused."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        if text_if_unparsed and not isinstance(exc, _OverBound):
            return text
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{origin}: invalid YAML{at}: {problem}") from None
    finally:
        loader.dispose()


class _OverBound(yaml.composer.ComposerError):
    """A document over MAX_YAML_DEPTH or MAX_YAML_NODES."""


class _Bounds:
    """What the loader adds to YAML's safe loading: a depth bound while composing, and a mapping
    that refuses a key given twice (YAML lets the last one win silently, so a second `run:` would
    quietly undo the first) or a key that is a list or mapping."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _OverBound(
                    None,
                    None,
                    f"nested deeper than {MAX_YAML_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[attr-defined]
                )
            return super().compose_node(parent, index)  # type: ignore[misc,no-any-return]
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, merged by the safe constructor
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key is a list or mapping; keys are plain names", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)  # type: ignore[attr-defined]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc,no-any-return]


def _loader_class() -> type[Any]:
    """libyaml's parser (events, about ten times faster: every command reads the catalogue) where PyYAML
    has it, under PyYAML's own composer (so the bounds above apply) and safe constructor."""
    try:
        from yaml._yaml import CParser
    except ImportError:  # pragma: no cover - PyYAML built without libyaml

        class Slow(_Bounds, yaml.SafeLoader):
            pass

        return Slow

    class Fast(_Bounds, yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver, CParser):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    return Fast


_BoundedLoader = _loader_class()


def _check_size(root: yaml.Node) -> None:
    """Refuse a document that expands past MAX_YAML_NODES values: each alias counts as the whole value it
    stands for, so nine levels of nine aliases (a billion values) is refused at once, in microseconds."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        if total > MAX_YAML_NODES:
            raise _OverBound(
                None, None, f"the document expands to over {MAX_YAML_NODES:,} values (aliases)", node.start_mark
            )
        sizes[id(node)] = total
        return total

    size(root)


def describe_invalid(
    path: Path, exc: ValidationError, overridden: dict[str, str] | None = None, raw: Any = None
) -> str:
    """One line per problem: `file: key.path: what is wrong`, with the key path as the user wrote it (a
    union field's tags dropped, its failures on one line) and `(from --set ...)` for an overridden key."""
    overridden = overridden or {}
    problems: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    for err in exc.errors():
        loc = ".".join(_user_path(err["loc"], raw, missing=err["type"] == "missing"))
        msg = err["msg"].removeprefix("Value error, ")
        source = next((item for key, item in overridden.items() if loc == key or loc.startswith(key + ".")), None)
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
            if source is not None:
                msg = f"unknown key (from --set {source}); check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif source is not None:
            sources[loc or "(top level)"] = f" (from --set {source})"
        messages = problems.setdefault(loc or "(top level)", [])
        if msg not in messages:
            messages.append(msg)
    return "\n".join(f"{path}: {loc}: {'; or '.join(msgs)}{sources.get(loc, '')}" for loc, msgs in problems.items())


def _user_path(loc: tuple[int | str, ...], raw: Any, *, missing: bool) -> list[str]:
    """The parts of a pydantic location that are keys (or list positions) in the spec as written."""
    parts: list[str] = []
    node = raw
    for index, part in enumerate(loc):
        found = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if found:
            node = node[part]
        elif missing and index == len(loc) - 1 and isinstance(node, dict):
            pass  # the key that is missing
        elif raw is not None or not (isinstance(part, int) or str(part).isidentifier()):
            continue  # a union member's tag (constrained-int, literal['auto'])
        parts.append(str(part))
    return parts


# Byte-order marks of the encodings a spreadsheet may save "Unicode text" in; polars reads UTF-8 only.
_WIDE_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_PAIRS = json.JSONDecoder(object_pairs_hook=list)  # an object as its (key, value) pairs, every one kept
_POLARS_DUPLICATE = re.compile(r"name '(.*)' has more than one occurrence|duplicate struct field '(.*)'")


def refuse_ambiguous_names(path: Path, where: str) -> None:
    """Refuse an input in which one name stands for two values (a CSV header's column, a JSONL key at any
    depth, a Parquet column or struct field), which the readers settle silently, and a CSV in UTF-16 or
    UTF-32; UsageError naming the file, the line if any, and the name. Empty CSV names may repeat."""
    name = str(path)
    if name.endswith(".csv"):
        _check_csv_header(path, where)
    elif name.endswith((".jsonl", ".ndjson")):
        _check_json_keys(path, where)
    else:
        _check_parquet_names(path, where)


def _twice(path: Path, where: str, name: str, place: str) -> UsageError:
    return UsageError(f"{where}: input.paths: {path}: {place} names {name!r} twice; rename or drop one of them")


def _check_csv_header(path: Path, where: str) -> None:
    start = head(path)
    if start is None:
        return  # polars names the problem
    for bom, encoding in _WIDE_BOMS.items():
        if start.startswith(bom):
            raise UsageError(f"{where}: input.paths: {path} is {encoding} text; save it as UTF-8")
    line = start.split(b"\n", 1)[0]
    if b"\x00" in line:
        raise UsageError(f"{where}: input.paths: {path} has NUL bytes in its header (UTF-16 text?); save it as UTF-8")
    try:
        header = next(csv.reader([line.decode("utf-8-sig").rstrip("\r")]), [])
    except (UnicodeDecodeError, csv.Error):
        return  # polars names the problem
    seen: set[str] = set()
    for column in header:
        if column and column in seen:
            raise _twice(path, where, column, "the header")
        seen.add(column)


def _check_json_keys(path: Path, where: str) -> None:
    """Each line decoded with every key kept (about a microsecond a line more than polars' own read); a
    line that is not JSON is left to polars, which refuses the file."""
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    value = _PAIRS.decode(line.decode("utf-8-sig" if number == 1 else "utf-8"))
                except ValueError:
                    continue
                key = _repeated_key(value)
                if key is not None:
                    raise _twice(path, where, key, f"line {number}")
    except OSError:
        return  # polars names the problem


def _repeated_key(value: Any) -> str | None:
    """The first key an object (as pairs: a list of tuples) gives twice, at any depth; else None."""
    if type(value) is not list:
        return None
    if value and type(value[0]) is tuple:  # an object's pairs (a JSON array never holds tuples)
        pairs = cast("list[tuple[str, Any]]", value)
        if len({key for key, _ in pairs}) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    return key
                seen.add(key)
        values: Iterable[Any] = (item for _, item in pairs)
    else:
        values = value
    for item in values:
        found = _repeated_key(item)
        if found is not None:
            return found
    return None


def _check_parquet_names(path: Path, where: str) -> None:
    """Polars refuses a Parquet column or struct field named twice (the struct only when its rows are
    read): asked for the whole schema now, its refusal is put as the other formats' is."""
    import polars as pl

    try:
        pl.scan_parquet(path).head(1).collect()
    except (pl.exceptions.DuplicateError, pl.exceptions.ComputeError) as exc:
        found = _POLARS_DUPLICATE.search(str(exc))
        if found is None:
            return  # not a name twice: the read that follows names the problem
        raise _twice(path, where, found.group(1) or found.group(2), "its schema") from None
    except (pl.exceptions.PolarsError, OSError):
        return
