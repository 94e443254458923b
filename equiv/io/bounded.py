"""The one reader of every file the suite is given: regular files only, a size limit checked
before reading and enforced while reading, JSON nesting bounded, and every failure one line.

Why each rule: a FIFO blocks `open` forever (so it is opened non-blocking and refused on its own
fstat, never read); a symlink to /dev/zero or any device never ends (only regular targets are
read; symlinks are followed, as the Hugging Face cache links snapshot files to blobs); a file's
stat size can lie or grow while it is read (at most limit + 1 bytes are ever read); deeply nested
JSON makes the parser recurse (the nesting is measured on the text first); and a symlink loop or
an over-long path is named as what it is, not as a missing file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat

import numpy as np

from equiv.errors import EquivError, clip, quote, quote_path

MAX_JSON_DEPTH = 64
"""Deepest JSON nesting accepted. A transformers config.json nests 3 levels (a rope_scaling or
quantization_config object), a safetensors header 3, a golden recording's provenance 5, a report 6;
Python's parser recurses once per level and fails near 1000 with RecursionError."""

MAX_JSON_BYTES = 16 * 2**20
"""Default size limit of a JSON file: configs, indexes and recordings are kilobytes."""

_OS_ERRORS = {
    errno.ENOENT: "nothing: the file does not exist",
    errno.ELOOP: "a symlink loop",
    errno.ENAMETOOLONG: "a path too long",
    errno.ENOTDIR: "a path through something that is not a directory",
    errno.EACCES: "a file it may not read (permission denied)",
    errno.EPERM: "a file it may not read (operation not permitted)",
}


def describe_mode(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def describe_os_error(e: OSError, path=None) -> str:
    """An OSError as what it is: 'a symlink loop', 'a path too long', 'a broken symlink', ..."""
    if e.errno == errno.ENOENT and path is not None:
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return "a broken symlink (its target does not exist)"
        except OSError:
            pass
    return _OS_ERRORS.get(e.errno, e.strerror or type(e).__name__)


def probe(path, what: str, error=EquivError) -> os.stat_result | None:
    """The stat of `path` (symlinks followed), or None when nothing is there at all. A symlink loop,
    an over-long path, a broken symlink or an unreadable directory is an `error` naming it: such an
    entry exists, so it must not be mistaken for an absent file."""
    try:
        return os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            try:
                os.lstat(path)  # a dangling symlink is there, and is not what was asked for
            except OSError:
                return None
        raise error(f"{quote_path(path)}: expected {what}, got {describe_os_error(e, path)}") from None
    except ValueError:  # an embedded NUL byte
        raise error(f"{quote_path(path)}: expected {what}, got a path with a NUL byte") from None


def open_regular(path, what: str, error=EquivError, limit: int | None = None):
    """`path` opened for binary reading, after checking that it is a regular file (on the opened
    descriptor: a file swapped in between cannot slip through) of at most `limit` bytes. A FIFO is
    opened non-blocking, so it is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{quote_path(path)}: expected {what}, got "
                    f"{describe_os_error(FileNotFoundError(errno.ENOENT, ''), path)}") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened non-blocking for writing
            raise error(f"{quote_path(path)}: expected {what} (a regular file), got a socket") from None
        raise error(f"{quote_path(path)}: expected {what}, got {describe_os_error(e, path)}") from None
    except ValueError:
        raise error(f"{quote_path(path)}: expected {what}, got a path with a NUL byte") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{quote_path(path)}: expected {what} (a regular file), got "
                        f"{describe_mode(st.st_mode)}")
        if limit is not None and st.st_size > limit:
            raise error(f"{quote_path(path)}: expected {what} of at most {limit} bytes, got "
                        f"{st.st_size} bytes")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, what: str, limit: int, error=EquivError) -> bytes:
    """The whole of a regular file of at most `limit` bytes (checked before reading, and enforced
    while reading: at most limit + 1 bytes are read, whatever the file claims)."""
    with open_regular(path, what, error, limit) as f:
        try:
            blob = f.read(limit + 1)
        except OSError as e:
            raise error(f"{quote_path(path)}: expected a readable {what}, got "
                        f"{describe_os_error(e)}") from None
    if len(blob) > limit:
        raise error(f"{quote_path(path)}: expected {what} of at most {limit} bytes, it grew past that "
                    "while being read")
    return blob


def json_type(v) -> str:
    """A parsed JSON value's type in JSON's words: 'a JSON list', 'JSON null', ..."""
    if v is None:
        return "JSON null"
    if isinstance(v, bool):
        return f"a JSON boolean ({'true' if v else 'false'})"
    return {dict: "a JSON object", list: "a JSON list", str: "a JSON string", int: "a JSON number",
            float: "a JSON number"}.get(type(v), type(v).__name__)


# A string, or an unterminated one up to the end: matching the latter too keeps the scan linear
# (a pattern that fails on it would be retried from every later quote).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_BLOCK = 1 << 20


def json_depth(blob: bytes) -> int:
    """The deepest nesting of [ and { in JSON text, outside strings: strings are blanked with one
    regex, then the depth is a running sum, block by block (memory stays a few bytes per input
    byte); linear at C speed on any text, valid JSON or not."""
    bare = np.frombuffer(_STRING.sub(b'""', blob), np.uint8)
    deepest = level = 0
    for i in range(0, bare.size, _BLOCK):
        part = bare[i:i + _BLOCK]
        steps = (((part == ord("[")) | (part == ord("{"))).astype(np.int8)
                 - ((part == ord("]")) | (part == ord("}"))).astype(np.int8))
        running = np.cumsum(steps, dtype=np.int64) + level
        deepest, level = max(deepest, int(running.max())), int(running[-1])
    return deepest


class DuplicateKey(Exception):
    """Internal: a JSON object with the same key twice."""


def no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:  # json keeps the last one silently: which one did the author mean?
            raise DuplicateKey(f"expected each key once, got {quote(k)} twice")
        seen[k] = v
    return seen


def parse_json(blob: bytes, where: str, what: str, error=EquivError, max_depth: int = MAX_JSON_DEPTH,
               object_pairs_hook=no_duplicate_keys):
    """JSON text -> value, strictly: UTF-8, nesting at most `max_depth`, no key twice; every failure
    one `error` line starting with `where` (an already quoted path or name)."""
    depth = json_depth(blob)
    if depth > max_depth:
        raise error(f"{where}: expected {what} nested at most {max_depth} levels deep, got {depth} levels")
    try:
        return json.loads(blob.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except DuplicateKey as e:
        raise error(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise error(f"{where}: expected {what} as valid JSON, got {type(e).__name__}: "
                    f"{clip(text, 100)}") from None


def read_json(path, what: str, limit: int = MAX_JSON_BYTES, error=EquivError,
              max_depth: int = MAX_JSON_DEPTH):
    """A JSON file read through `read_bytes` and `parse_json`."""
    return parse_json(read_bytes(path, what, limit, error), quote_path(path), what, error, max_depth)


def read_json_object_file(path, what: str, limit: int = MAX_JSON_BYTES, error=EquivError,
                          max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A JSON file that must hold one object: anything else is 'expected a JSON object, got a JSON
    list' (or null, a number, ...)."""
    raw = read_json(path, what, limit, error, max_depth)
    if not isinstance(raw, dict):
        raise error(f"{quote_path(path)}: expected a JSON object, got {json_type(raw)}")
    return raw


def read_text(path, what: str, limit: int, error=EquivError) -> str:
    """A UTF-8 text file through `read_bytes`."""
    blob = read_bytes(path, what, limit, error)
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{quote_path(path)}: expected UTF-8 text for {what}, got {e.reason} at byte "
                    f"{e.start}") from None
