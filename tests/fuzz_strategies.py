"""Hypothesis strategies for protobuf messages, derived from their descriptors.

``message_strategy(descriptor)`` builds any message of a type: every field is left unset or
given an edge-heavy value (empty, huge, unicode and NUL strings; integer extremes and
negatives; NaN and infinities; enum numbers no one defined), repeated and map fields get a few
or many entries, nested messages recurse (to a depth limit), and a oneof gets one member or
none. Nothing is listed by hand, so fields added to the protos are fuzzed without edits here.
``overrides`` replaces the strategy of chosen fields (by full name, e.g.
``omni.v1.SamplingParams.max_tokens``) to steer examples towards requests that get far into
the servers instead of being rejected at validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

Strategy = st.SearchStrategy[Any]
Overrides = Mapping[str, Strategy]

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

_SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), float("-inf"), 1e-45]

# Strings that have broken servers elsewhere: NUL, control and format characters, the largest
# code point, combining marks, path and format-string fragments, HOST:PORT look-alikes.
_NASTY_STRINGS = [
    "\x00",
    "a\x00b",
    " ",
    "\n",
    "\t\r\n",
    "\U0010ffff",
    "\u202e\u0301",
    "🙂🙂🙂",
    "%s%n%x",
    "{}{0}",
    "../../etc/passwd",
    "'; --",
    "null",
    ":",
    "::1",
    "[::1]:1",
    "unix:/nonexistent",
    "localhost:1",
    "127.0.0.1:99999999999",
]

# Sizes of huge strings and byte blobs; 1 Mi characters of a 4-byte code point is 4 MiB on the
# wire, well under the 64 MiB message limit of the servers.
_HUGE_SIZES = [4096, 65536, 1 << 20]


def weighted(*choices: tuple[int, Strategy]) -> Strategy:
    """One of the strategies, each chosen with a chance proportional to its weight."""
    slots = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(slots) - 1).flatmap(lambda i: slots[i])


def text() -> st.SearchStrategy[str]:
    """Strings: empty, short random unicode (no lone surrogates: proto strings are UTF-8),
    nasty fixed ones, and now and then a huge one."""
    huge = st.builds(
        lambda c, n: c * n,
        st.sampled_from(["x", "é", "🙂", "\x00", "ab "]),
        st.sampled_from(_HUGE_SIZES),
    )
    return weighted(
        (6, st.just("")),
        (10, st.text(max_size=16)),
        (4, st.text(max_size=200)),
        (6, st.sampled_from(_NASTY_STRINGS)),
        (1, huge),
    )


def binary() -> st.SearchStrategy[bytes]:
    huge = st.builds(
        lambda b, n: b * n, st.sampled_from([b"\x00", b"\xff"]), st.sampled_from(_HUGE_SIZES)
    )
    return weighted((3, st.just(b"")), (8, st.binary(max_size=64)), (1, huge))


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers of [lo, hi], often at or next to an extreme."""
    edges = sorted({v for v in (0, 1, -1, 2, lo, lo + 1, hi, hi - 1) if lo <= v <= hi})
    return st.one_of(
        st.sampled_from(edges),
        st.integers(max(lo, -10), min(hi, 100)),
        st.integers(lo, hi),
    )


def floats(width: Literal[32, 64]) -> st.SearchStrategy[float]:
    """Floats of the width of the field (32: float, 64: double), NaN and infinities included."""
    specials = _SPECIAL_FLOATS + (
        [3.4028234663852886e38] if width == 32 else [1.7976931348623157e308]
    )
    return st.one_of(st.sampled_from(specials), st.floats(width=width))


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _real_oneof(field: FieldDescriptor) -> str | None:
    """The name of the oneof ``field`` belongs to; None for proto3 ``optional`` (a synthetic
    oneof of one field) and for fields in no oneof."""
    oneof = field.containing_oneof
    if oneof is None:
        return None
    if len(oneof.fields) == 1 and oneof.name == "_" + field.name:
        return None
    return str(oneof.name)


def lists(element: Strategy, many: int = 300) -> st.SearchStrategy[list[Any]]:
    """A few entries usually, sometimes many (up to ``many``)."""
    return weighted(
        (8, st.lists(element, max_size=4)), (1, st.lists(element, min_size=32, max_size=many))
    )


class _Builder:
    def __init__(self, overrides: Overrides, max_depth: int) -> None:
        self.overrides = overrides
        self.max_depth = max_depth

    def scalar(self, field: FieldDescriptor, depth: int) -> Strategy:
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            return text()
        if kind == FieldDescriptor.TYPE_BYTES:
            return binary()
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_FLOAT:
            return floats(32)
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return floats(64)
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            known = [v.number for v in field.enum_type.values]
            # proto3 enums are open: any int32 is a valid value on the wire.
            return st.one_of(st.sampled_from(known), integers(-(2**31), 2**31 - 1))
        if kind in _INT_RANGES:
            return integers(*_INT_RANGES[kind])
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self.message(_message_type(field), depth + 1)
        raise NotImplementedError(f"no strategy for field {field.full_name} of type {kind}")

    def value(self, field: FieldDescriptor, depth: int) -> Strategy:
        """The value of a whole field: a list, a dict or one value."""
        override = self.overrides.get(field.full_name)
        if override is not None:
            return override
        if _is_map(field):
            entry = _message_type(field)
            key = self.scalar(entry.fields_by_name["key"], depth)
            value = self.scalar(entry.fields_by_name["value"], depth)
            return st.dictionaries(key, value, max_size=4)
        if _is_repeated(field):
            nested = field.type == FieldDescriptor.TYPE_MESSAGE
            return lists(self.scalar(field, depth), many=40 if nested else 300)
        return self.scalar(field, depth)

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        if depth > self.max_depth:
            return st.builds(cls)
        plain: dict[str, Strategy] = {}
        oneofs: dict[str, list[FieldDescriptor]] = {}
        for field in descriptor.fields:
            group = _real_oneof(field)
            if group is not None:
                oneofs.setdefault(group, []).append(field)
            elif _is_repeated(field) or field.full_name in self.overrides:
                plain[field.name] = self.value(field, depth)
            else:
                plain[field.name] = st.none() | self.value(field, depth)
        chosen: dict[str, Strategy] = {
            group: st.one_of(
                st.none(),
                *(st.tuples(st.just(f.name), self.value(f, depth)) for f in members),
            )
            for group, members in oneofs.items()
        }

        def build(values: dict[str, Any], picks: dict[str, tuple[str, Any] | None]) -> Message:
            message = cls()
            for name, value in values.items():
                _set(message, descriptor.fields_by_name[name], value)
            for pick in picks.values():
                if pick is not None:
                    _set(message, descriptor.fields_by_name[pick[0]], pick[1])
            return message

        return st.builds(build, st.fixed_dictionaries(plain), st.fixed_dictionaries(chosen))


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set ``field`` of ``message`` to ``value`` (None: leave it unset)."""
    if value is None:
        return
    name = field.name
    if _is_map(field):
        target = getattr(message, name)
        is_message = (
            _message_type(field).fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE
        )
        for key, item in value.items():
            if is_message:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(field):
        target = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def message_strategy(
    descriptor: Descriptor, overrides: Overrides | None = None, max_depth: int = 3
) -> st.SearchStrategy[Message]:
    """Any message of the type ``descriptor`` describes (see the module's docstring)."""
    return _Builder(overrides or {}, max_depth).message(descriptor)


def raw_bytes() -> st.SearchStrategy[bytes]:
    """Bytes sent as a serialized message: random, truncated varints, bad UTF-8 in a string
    field, absurd lengths, unknown and deprecated wire types (groups)."""
    return st.one_of(
        st.binary(max_size=256),
        st.sampled_from(
            [
                b"",
                b"\x08",  # a tag with no value
                b"\x08\x80",  # a truncated varint
                b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
                b"\x0a\x02\xff\xfe",  # field 1, length 2, invalid UTF-8
                b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length 4 GiB
                b"\x0b\x0c",  # an empty group (wire type 3/4)
                b"\x0c",  # an end-group with no start
                b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number, unknown
                b"\x00",  # field number 0
                b"\x12\x00" * 1000,  # the same field many times
            ]
        ),
    )
