"""A JSON decoder for request bodies that never holds the GIL for long.

``json.loads`` (and pydantic's JSON parser) decode a document in one call into C: a thread
decoding a 60 MB body holds the GIL for seconds, and the event loop waits as long.
:func:`parse_json` reads the same values in steps, each call into C handling at most about
:data:`STEP` characters, so the interpreter can hand the GIL to other threads every few
milliseconds. :func:`release` frees a decoded value the same way (one ``del`` of a million lists
frees them all in one call).
"""

from __future__ import annotations

import bisect
import collections
import functools
import gc
import itertools
import json
import json.decoder
import json.scanner
import operator
import re
from collections.abc import Callable, Iterator
from typing import Any, cast

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_MEMBERS",
    "MAX_NUMBER",
    "STEP",
    "JSONError",
    "parse_json",
    "release",
]

#: Characters of JSON text one call into C may handle: ~1 ms on a slow core.
STEP = 1 << 16
#: Containers may nest this deep (inputs need 6 levels; pydantic allows ~200).
MAX_JSON_DEPTH = 64
#: An object larger than STEP characters may have this many members (a request has fewer
#: than ten fields; a smaller object cannot hold many).
MAX_MEMBERS = 1000
#: The longest number (Python's int() refuses more than 4300 digits anyway).
MAX_NUMBER = 5000


# json's C string scanner (the one json.loads uses; not in typeshed's json.decoder).
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # pyright: ignore[reportAttributeAccessIssue]
_WS = re.compile(r"[ \t\n\r]*")
_SPECIAL = re.compile(r'[\[\]{}"]')  # ends a run of scalars
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
# A \uXXXX escape of a UTF-16 surrogate (or text after an escaped backslash: "\\ud800").
_SURROGATE = re.compile(r"\\u([dD][89a-fA-F])[0-9a-fA-F]{2}")


class JSONError(ValueError):
    """The body is not valid JSON: ``message`` and the character offset ``pos``."""

    def __init__(self, message: str, text: str = "", pos: int = 0):
        if text:
            line = text.count("\n", 0, pos) + 1
            column = pos - (text.rfind("\n", 0, pos) + 1) + 1
            message = f"{message} at line {line} column {column} (char {pos})"
        super().__init__(message)
        self.pos = pos


def parse_json(data: bytes) -> Any:
    """The JSON document ``data`` (UTF-8), as ``json.loads`` reads it, in bounded steps.

    The same values as ``json.loads`` (``NaN`` and ``Infinity`` included), except that an empty
    body is ``{}`` (as BentoML reads it), and lone surrogates (``"\\ud800"``, which no UTF-8
    response could carry), numbers beyond ``MAX_NUMBER`` characters, nesting beyond
    ``MAX_JSON_DEPTH`` and large objects of more than ``MAX_MEMBERS`` members are refused. Every call into C code handles about ``STEP`` characters
    at most, so a thread running this leaves the GIL to others every few milliseconds.
    ``JSONError`` when the document is invalid.
    """
    if not data:
        return {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JSONError(f"the body is not UTF-8 ({err.reason} at byte {err.start})") from None
    if "\\" in text:
        _check_surrogates(text)
    return _Decoder(text).document()


_LONE_HIGH = "a lone surrogate escape (\\uD800-\\uDBFF without its pair)"
_LONE_LOW = "a lone surrogate escape (\\uDC00-\\uDFFF without its pair)"


def _check_surrogates(text: str) -> None:
    """Refuse an escaped UTF-16 surrogate that is not half of a pair (a high one, then a
    low one), searching a window of 4 STEP characters at a time."""
    pending = -1  # where an unpaired high surrogate escape ends
    pos, window = 0, 4 * STEP
    while pos < len(text):
        match = _SURROGATE.search(text, pos, min(pos + window, len(text)))
        if match is None:
            pos = max(pos + window - 5, pos + 1)  # an escape may straddle the window's end
            continue
        pos = match.end()
        start = match.start()
        if _backslashes(text, 0, start) % 2:  # "\\ud800": an escaped backslash, then text
            continue
        high = match.group(1)[1] in "89abAB"
        if pending >= 0 and (high or start != pending):
            raise JSONError(_LONE_HIGH, text, pending - 6)
        if high:
            pending = match.end()
        elif start == pending:
            pending = -1
        else:
            raise JSONError(_LONE_LOW, text, start)
    if pending >= 0:
        raise JSONError(_LONE_HIGH, text, pending - 6)


def _backslashes(text: str, start: int, end: int) -> int:
    """How many backslashes end ``text[start:end]``."""
    i = end
    while i > start and text[i - 1] == "\\":
        i -= 1
    return end - i


class _Decoder:
    """JSON text to Python values, never more than ~STEP characters per call into C.

    A container that fits in a window of STEP characters is decoded by ``json``'s C scanner in
    one call. A larger one is walked here: an array a run of siblings at a time (scalars up to
    the last comma of a window; containers or strings up to the last boundary between two
    siblings, found from the first one's shape and proven by decoding the run), an object a
    member at a time (at most MAX_MEMBERS), a long string a window at a time.
    """

    def __init__(self, text: str):
        self.text = text
        # json's C scanner, with json.loads's defaults (NaN and Infinity accepted, strict strings)
        self.scan = json.scanner.make_scanner(cast(Any, json.JSONDecoder()))

    def document(self) -> Any:
        text = self.text
        value, end = self.value(self.ws(0), 0, 0)
        end = self.ws(end)
        if end != len(text):
            raise self.error("Extra data", end)
        return value

    def ws(self, pos: int) -> int:
        return cast(re.Match, _WS.match(self.text, pos)).end()

    def error(self, message: str, pos: int) -> JSONError:
        return JSONError(message, self.text, pos)

    def failed(self, err: Exception, offset: int, at: int) -> JSONError:
        """A JSONError for ``err`` of a scan whose positions start at ``offset``."""
        if isinstance(err, json.JSONDecodeError):
            return self.error(err.msg, offset + err.pos)
        if isinstance(err, StopIteration):
            return self.error("Expecting value", offset + int(err.value or 0))
        if isinstance(err, RecursionError):
            return self.error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", at)
        return self.error(f"a number is too long ({err})", at)  # int() beyond 4300 digits

    def value(self, pos: int, depth: int, hint: int) -> tuple[Any, int]:
        """The value at ``pos`` and where it ends; ``hint``: the size of its previous sibling."""
        char = self.text[pos : pos + 1]
        if char in ("[", "{"):
            if depth >= MAX_JSON_DEPTH:
                raise self.error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", pos)
            small = self.small(pos, hint)
            if small is not None:
                return small
            return self.array(pos, depth) if char == "[" else self.object(pos, depth)
        if char == '"':
            return self.string(pos)
        return self.scalar(pos)

    def small(self, pos: int, hint: int) -> tuple[Any, int] | None:
        """The container at ``pos`` decoded in one call, if it fits in a window of STEP
        characters (tried from twice ``hint``, doubling); None if it does not."""
        text = self.text
        size = min(max(2 * hint, 256), STEP)
        while True:
            end = min(pos + size, len(text))
            try:
                value, stop = self.scan(text[pos:end], 0)
                return value, pos + stop
            except RecursionError as err:
                raise self.failed(err, pos, pos) from None
            except (json.JSONDecodeError, StopIteration, ValueError) as err:
                if end == len(text):  # the window held the rest: a real error
                    raise self.failed(err, pos, pos) from None
            if size >= STEP:
                return None
            size *= 2

    def array(self, pos: int, depth: int) -> tuple[list, int]:
        items: list = []
        try:
            return self._array(pos, depth, items)
        except BaseException:
            release(items)  # a step at a time, not with the error, in one go
            raise

    def _array(self, pos: int, depth: int, items: list) -> tuple[list, int]:
        text, hint = self.text, 0
        boundary: re.Pattern | None = None  # between two container siblings, once one is seen
        batch = True  # False once a boundary turned out not to be one
        pos = self.ws(pos + 1)
        if text[pos : pos + 1] == "]":
            return items, pos + 1
        while True:
            char = text[pos : pos + 1]
            if char not in ("[", "{", '"', ""):
                run = self.scalars(pos)
            elif boundary is not None and batch:
                run = self.siblings(pos, boundary)
                batch = run is not False
            else:
                run = None
            if isinstance(run, tuple):
                items.extend(run[0])
                pos = run[1]
            else:
                start = pos
                value, pos = self.value(pos, depth + 1, hint)
                hint = pos - start
                if boundary is None and char in ("[", "{", '"'):
                    boundary = _boundary(text, start, pos)
                items.append(value)
            pos = self.ws(pos)
            char = text[pos : pos + 1]
            if char == ",":
                pos = self.ws(pos + 1)
            elif char == "]":
                return items, pos + 1
            else:
                raise self.error("Expecting ',' delimiter", pos)

    def scalars(self, pos: int) -> tuple[list, int] | None:
        """A run of scalars (numbers, true, false, null) from ``pos`` to the array's end or a
        comma, within one window; None if the run would hold no value (the window has no comma
        after its first scalar, or ``pos`` is at the ``]``): value() reads one, or refuses."""
        text = self.text
        end = min(pos + STEP, len(text))
        special = _SPECIAL.search(text, pos, end)
        if special is not None and special.group() == "]":
            stop = special.start()  # the array ends in the window
        else:
            stop = text.rfind(",", pos, special.start() if special is not None else end)
        if stop <= pos:
            # Nothing before the ']' (``pos`` is past whitespace): "[1,2,]" cut after a comma.
            # An empty run would let the array end where the comma asked for a value.
            return None
        try:
            values, _ = self.scan("[" + text[pos:stop] + "]", 0)
        except (json.JSONDecodeError, StopIteration, ValueError, RecursionError) as err:
            raise self.failed(err, pos - 1, pos) from None
        return values, stop

    def siblings(self, pos: int, boundary: re.Pattern) -> tuple[list, int] | bool | None:
        """The siblings from ``pos`` to the last ``boundary`` in a window, decoded in one call;
        None if the window has no boundary, False if the run does not decode as whole values
        (the boundary was inside a value: the data is not as regular as its first element)."""
        text = self.text
        last = None
        for last in boundary.finditer(text, pos, min(pos + STEP, len(text))):  # noqa: B007
            pass
        if last is None:
            return None
        comma = text.index(",", last.start())
        run = "[" + text[pos:comma] + "]"
        try:
            values, stop = self.scan(run, 0)
        except (json.JSONDecodeError, StopIteration, ValueError, RecursionError):
            return False
        # A run that decodes whole, brackets and quotes balanced, ends between two siblings.
        return (values, comma) if stop == len(run) else False

    def scalar(self, pos: int) -> tuple[Any, int]:
        text = self.text
        number = _NUMBER.match(text, pos, pos + MAX_NUMBER)
        if number is not None and number.end() == pos + MAX_NUMBER < len(text):
            raise self.error(f"a number longer than {MAX_NUMBER} characters", pos)
        try:
            return self.scan(text, pos)
        except (json.JSONDecodeError, StopIteration, ValueError, RecursionError) as err:
            raise self.failed(err, 0, pos) from None

    def string(self, pos: int) -> tuple[str, int]:
        """The string at ``pos``; a long one is decoded a window at a time, never cutting an
        escape or a surrogate pair."""
        text = self.text
        quote = text.find('"', pos + 1, pos + 1 + STEP)
        if quote != -1 and text.find("\\", pos + 1, quote) == -1:
            try:  # no escapes before that quote: the string ends there
                return _scanstring(text, pos + 1)
            except json.JSONDecodeError as err:
                raise self.error(err.msg, err.pos) from None
        parts, start = [], pos + 1
        while True:
            end = min(start + STEP, len(text))
            if end == start:
                raise self.error("Unterminated string starting at", pos)
            quote = self.closing_quote(start, end)
            cut = quote if quote is not None else self.cut(start, end)
            try:
                parts.append(_scanstring('"' + text[start:cut] + '"', 1)[0])
            except json.JSONDecodeError as err:
                raise self.error(err.msg, start - 1 + err.pos) from None
            if quote is not None:
                return "".join(parts), quote + 1
            start = cut

    def closing_quote(self, start: int, end: int) -> int | None:
        """The first unescaped quote in ``text[start:end]`` (``start`` is never mid-escape)."""
        quote = self.text.find('"', start, end)
        while quote != -1 and _backslashes(self.text, start, quote) % 2:
            quote = self.text.find('"', quote + 1, end)
        return None if quote == -1 else quote

    def cut(self, start: int, end: int) -> int:
        """Where to cut a string in ``(start, end]``: not inside an escape, nor between the two
        escapes of a surrogate pair."""
        text = self.text
        last = text.rfind("\\", start, end)
        if last == -1 or _backslashes(self.text, start, last + 1) % 2 == 0:
            return end  # no escape starts in the window's last backslash run
        escape = text[last + 1 : last + 4].lower()
        if escape in ("udc", "udd", "ude", "udf") and last - 6 > start:
            return last - 6  # a low surrogate: its high half (checked by parse_json) goes with it
        if last > start and escape not in ("udc", "udd", "ude", "udf"):
            return last  # before the escape
        # The window starts with the escape (or its pair): take it whole.
        first = start if last - 6 <= start < last else last
        high = text[first + 1 : first + 4].lower() in ("ud8", "ud9", "uda", "udb")
        size = 12 if high else 6 if text[first + 1 : first + 2] == "u" else 2
        return min(first + size, len(text))

    def object(self, pos: int, depth: int) -> tuple[dict, int]:
        members: dict = {}
        try:
            return self._object(pos, depth, members)
        except BaseException:
            release(members)
            raise

    def _object(self, pos: int, depth: int, members: dict) -> tuple[dict, int]:
        text = self.text
        pos = self.ws(pos + 1)
        if text[pos : pos + 1] == "}":
            return members, pos + 1
        while True:
            if text[pos : pos + 1] != '"':
                raise self.error("Expecting property name enclosed in double quotes", pos)
            if len(members) >= MAX_MEMBERS:
                raise self.error(f"an object with more than {MAX_MEMBERS} members", pos)
            key, pos = self.string(pos)
            pos = self.ws(pos)
            if text[pos : pos + 1] != ":":
                raise self.error("Expecting ':' delimiter", pos)
            members[key], pos = self.value(self.ws(pos + 1), depth + 1, 0)
            pos = self.ws(pos)
            char = text[pos : pos + 1]
            if char == ",":
                pos = self.ws(pos + 1)
            elif char == "}":
                return members, pos + 1
            else:
                raise self.error("Expecting ',' delimiter", pos)


def _boundary(text: str, start: int, end: int) -> re.Pattern:
    """The boundary between siblings shaped like ``text[start:end]`` (a container or a string):
    its closing run of brackets (or its quote), a comma, the opening run of the next."""
    first, last = text[start : min(start + 8, end)], text[max(end - 8, start) : end]
    head, tail = len(first) - len(first.lstrip("[{")), len(last) - len(last.rstrip("]}"))
    if head == 0:  # a string
        return re.compile(r'"[ \t\n\r]*,[ \t\n\r]*"')
    closing, opening = re.escape(text[end - tail : end]), re.escape(text[start : start + head])
    return re.compile(rf"(?<![\]}}]){closing}[ \t\n\r]*,[ \t\n\r]*{opening}(?![\[{{])")


def release(value: Any) -> None:
    """Free the lists and dicts of a parsed JSON value, a bounded number of objects per call.

    The containers are found level by level (``gc.get_referents`` of a batch of them at a
    time), then emptied, deepest level first (each ``clear`` frees leaves and containers
    already emptied), and dropped in slices. A value shared with something else is emptied
    too: release only what nothing else will read.
    """
    if not isinstance(value, list | dict):
        return
    levels: list[list] = [[value]]
    while levels[-1]:
        below: list = []
        for batch in _batches(levels[-1]):
            if len(batch) == 1 and len(batch[0]) > _FREE_STEP:  # one large container: by slices
                items = batch[0] if isinstance(batch[0], list) else list(batch[0].values())
                slices = (items[i : i + STEP] for i in range(0, len(items), STEP))
            else:
                slices = (gc.get_referents(*batch),)
            for kids in slices:
                below += filter(_is_list, kids)
                below += filter(_is_dict, kids)
        levels.append(below)
    for level in reversed(levels):
        for batch in _batches(level):
            if len(batch) == 1 and isinstance(batch[0], list):
                while batch[0]:
                    del batch[0][-STEP:]
            collections.deque(map(_clear, batch), maxlen=0)  # C speed, a batch at a time
        while level:
            del level[-STEP:]


_FREE_STEP = 1 << 18  # objects one step may free: a few milliseconds
_is_list = functools.partial(type.__instancecheck__, list)
_is_dict = functools.partial(type.__instancecheck__, dict)
_clear = operator.methodcaller("clear")


def _batches(level: list) -> Iterator[list]:
    """Consecutive slices of ``level`` (containers) holding at most _FREE_STEP items in all,
    or one container above that alone."""
    for start in range(0, len(level), STEP):
        piece = level[start : start + STEP]
        ends = list(itertools.accumulate(map(len, piece)))
        i = 0
        while i < len(piece):
            j = max(bisect.bisect_right(ends, (ends[i - 1] if i else 0) + _FREE_STEP, i), i + 1)
            yield piece[i:j]
            i = j
