"""Atomic writes: a reader (or a crash) never sees half a file or half a model folder. And
`parse_json` for JSON that users hand in: nesting deep enough to exhaust Python's recursion is a
named DataError, not a RecursionError traceback. And the path checks every tool runs before work:
`check_writable`, `same_file`, `check_apart` (a run never writes over what it reads)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cut.errors import ConfigError, DataError

# deeper input is refused: records are flat objects (a chat record nests 4 levels), and Python's
# recursive code downstream (json.dumps with indent, copy.deepcopy) fails near 1,000 levels
MAX_JSON_DEPTH = 100


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a unique temp file beside `path`, fsync, then rename over it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def build_dir_atomic(dest: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` fills a temp folder beside `dest`, which then replaces `dest` whole."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():  # swap by two renames: dest is whole (old or new) at every moment but one
            dest.rename(old)
        tmp.rename(dest)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise ConfigError unless `path` (a folder or a file, existing or not) can be written: the
    nearest existing folder on the way to it must take a new file. Probed by creating and removing
    a temp file there, so it holds for root, read-only mounts and a parent that is a file."""
    target = Path(path).absolute()
    probe_dir = target if target.is_dir() else target.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"{what} {path}: cannot be written: {probe_dir} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cut-write-check.", dir=probe_dir)
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot be written: {probe_dir}: {err.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def same_file(a: str | Path, b: str | Path) -> bool:
    """The same file (or folder) by path, through links, or b a folder that holds a."""
    pa, pb = Path(a).resolve(), Path(b).resolve()
    if pa == pb or (pb.is_dir() and pb in pa.parents):
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)  # a hard link
    except OSError:
        return False


def check_apart(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """ConfigError naming the option when an output of a run is one of its inputs (or another of
    its outputs): a run never writes over what it reads. Keys name the options; None is unset."""
    seen: list[tuple[str, str | Path]] = []
    given = [(name, path) for name, path in inputs.items() if path]
    for name, path in outputs.items():
        if not path:
            continue
        for other, taken in given + seen:
            if same_file(path, taken):
                raise ConfigError(
                    f"{name} {path} is also {other} of this run; outputs are never inputs or each "
                    "other: give another path"
                )
        seen.append((name, path))


def parse_json(text: str, source: str) -> Any:
    """json.loads for a file a user hands in; DataError naming `source` when the value nests deeper
    than MAX_JSON_DEPTH containers (the C parser itself stops with a RecursionError near 1,000).
    Invalid JSON still raises json.JSONDecodeError, for the caller to word with its position."""
    try:
        value = json.loads(text)
    except RecursionError:  # refused below, outside the handler: no chained traceback
        value, depth = None, MAX_JSON_DEPTH + 1
    else:
        depth = json_depth(value, MAX_JSON_DEPTH + 1)
    if depth > MAX_JSON_DEPTH:
        raise DataError(
            f"{source}: JSON nested more than {MAX_JSON_DEPTH} levels deep; records are flat objects"
        )
    return value


def json_depth(value: Any, stop: int | None = None) -> int:
    """How many containers (lists, objects) nest in a parsed JSON value: 0 for a scalar, 1 for a flat
    list; counted level by level without recursion, and no further than `stop`."""
    depth, level = 0, [value]
    while depth != stop:
        level = [v for v in level if isinstance(v, (list, dict))]
        if not level:
            break
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


# AlpacaEval hashes every column of an answer file (pandas drop_duplicates), so a list or an object
# there crashes it: answer files hold such fields as JSON text and name them in this field
JSON_FIELDS = "json_fields"


def encode_json_fields(row: dict[str, Any], source: str = "record") -> dict[str, Any]:
    """`row` with every list or object value (a held-out record's `constraints`) replaced by its JSON
    text and the names of those fields in `json_fields` (comma-separated): each value is then a
    string, number, bool or null. decode_json_fields undoes it; a row with nothing nested is
    returned as it is, so encoding twice changes nothing."""
    nested = [k for k, v in row.items() if isinstance(v, (list, dict))]
    if not nested:
        return row
    if any("," in k for k in nested):
        raise DataError(
            f"{source}: a list or object field named with a comma cannot be listed in {JSON_FIELDS!r}"
        )
    names = [n for n in json_field_names(row, source) if n not in nested] + nested
    out = {
        k: json.dumps(v, ensure_ascii=False) if k in nested else v for k, v in row.items() if k != JSON_FIELDS
    }
    return {**out, JSON_FIELDS: ",".join(names)}


def decode_json_fields(row: dict[str, Any], source: str = "record") -> dict[str, Any]:
    """The inverse of encode_json_fields: the fields `json_fields` names parsed back, that field
    dropped; a row without it is returned as it is. DataError names the field that is not JSON."""
    if JSON_FIELDS not in row:
        return row
    names = json_field_names(row, source)
    out = {k: v for k, v in row.items() if k != JSON_FIELDS}
    for name in names:
        if isinstance(out.get(name), str):
            where = f"{source}, field {name!r}"
            try:
                out[name] = parse_json(out[name], where)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: named in {JSON_FIELDS!r} but not JSON: {err.msg}") from None
    return out


def json_field_names(row: dict[str, Any], source: str = "record") -> list[str]:
    """The names in a row's `json_fields` (none when it has no such field)."""
    value = row.get(JSON_FIELDS)
    if value is None:
        return []
    if not isinstance(value, str):
        raise DataError(
            f"{source}, field {JSON_FIELDS!r}: expected comma-separated field names, got {type(value).__name__}"
        )
    return [n for n in value.split(",") if n]
