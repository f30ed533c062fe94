"""Turns registered frozen-dataclass messages into msgpack frames and back.

A frame is one msgpack array ``[version, tag, body]``: ``version`` is the envelope
version both sides must speak, ``tag`` names the registered message type and ``body``
is a map from field name to field value. Nested registered dataclasses travel as their
own body map, without an envelope.

Frames come from other processes, so ``Codec.decode`` treats every byte as hostile: the
only exception it lets out is ``DecodeError``. ``Codec.encode`` treats a bad message as
the caller's bug and raises ``TypeError`` or ``ValueError``. A float is a finite number,
in a typed field or under ``Any``: NaN and the infinities are refused both ways.

Each field annotation is compiled once, at registration, into a pair of converters
(one per direction); encoding and decoding only call them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import reprlib
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from ._errors import DecodeError

T = TypeVar("T")

# Values under a `typing.Any` field are walked on both sides; the limit keeps a hostile
# peer from handing later code (equality, repr, pickling) a structure deep enough to hit
# Python's recursion limit. Typed fields need no such limit: their depth is fixed by the
# annotations, which cannot be recursive (a nested dataclass must be registered first).
_MAX_ANY_DEPTH = 64

_SCALAR_TYPES = (int, float, str, bytes, bool)
_PLAIN_SCALAR_TYPES = frozenset({type(None), bool, int, float, str, bytes})
_LITERAL_VALUE_TYPES = (int, str, bytes, bool, type(None), enum.Enum)
_ENUM_VALUE_TYPES = (int, float, str, bytes, bool, type(None))

_WIRE_KINDS = {
    type(None): "nil",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bin",
    tuple: "array",
    dict: "map",
}

# Peer-controlled values end up in error messages; keep those messages short.
_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlevel = 2

_ABSENT = object()


class _NoPassthrough:
    """Never the type of a value, so values of a field with this passthrough always go
    through its converters."""


class _Invalid(Exception):
    """A value does not fit its annotation.

    Internal: ``decode`` turns it into ``DecodeError`` and ``encode`` into ``TypeError``.
    ``path`` is filled in innermost first while the exception travels outwards.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def describe(self) -> str:
        """Returns the reason, prefixed with where in the message it was found."""
        if not self.path:
            return self.reason
        location = "".join(reversed(self.path)).removeprefix(".")
        return f"field {location}: {self.reason}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Conversion:
    """How values of one annotation are checked and converted in each direction.

    A value whose type is exactly ``passthrough`` is valid as it is in both directions,
    which lets the common case skip a function call.
    """

    passthrough: type
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _MessageType:
    """A registered dataclass with its compiled fields.

    Each field is ``(name, passthrough, decode, encode, required)``; plain tuples keep
    the per-message loops cheap.
    """

    cls: type
    tag: str
    fields: tuple[tuple[str, type, Callable[[Any], Any], Callable[[Any], Any], bool], ...]
    names: frozenset[str]


class _PerThreadPacker(threading.local):
    """One reusable msgpack Packer per thread.

    Reusing a Packer is much cheaper than ``msgpack.packb``, but a Packer has an internal
    buffer, so it must not be shared between threads.
    """

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _PerThreadPacker()


class _ExtTypeRefused(ValueError):
    """An ext value was found in a frame; a ValueError so that it joins msgpack's own."""


def _refuse_ext(code: int, data: bytes) -> object:
    """Refuses every msgpack ext value (``ext_hook`` of ``msgpack.unpackb``).

    Raises:
        _ExtTypeRefused: always.
    """
    raise _ExtTypeRefused(f"ext type {code}")


def _wire_kind(value: object) -> str:
    """Returns the msgpack name of a decoded value's kind, for error messages."""
    return _WIRE_KINDS.get(type(value), type(value).__qualname__)


def _annotation_name(hint: object) -> str:
    """Returns a readable name for an annotation, for error messages."""
    if isinstance(hint, type):
        return hint.__qualname__
    return repr(hint).replace("typing.", "")


def _describe_unpack_failure(error: ValueError) -> str:
    """Returns a DecodeError message for a failure of ``msgpack.unpackb``."""
    if isinstance(error, msgpack.ExtraData):
        return "trailing bytes after the envelope"
    if isinstance(error, msgpack.StackError):
        return "nesting too deep"
    if isinstance(error, UnicodeDecodeError):
        return f"invalid UTF-8 in a str: {error.reason} at byte {error.start}"
    if isinstance(error, msgpack.FormatError):
        return "not valid msgpack"
    # The second test matches msgpack's wording: ext types that unpackb decodes itself
    # (timestamps) never reach the ext hook and fail on max_ext_len=0 instead.
    if isinstance(error, _ExtTypeRefused) or "max_ext_len" in str(error):
        return f"ext types are not accepted ({error})"
    return f"malformed or truncated msgpack frame: {error}"


def _check_plain(value: Any, depth: int) -> None:
    """Checks that a value is plain msgpack data: what ``typing.Any`` fields carry.

    Plain data is None, bool, int, float, str, bytes, and tuples and dicts (with str or
    bytes keys) of plain data, at most ``_MAX_ANY_DEPTH`` containers deep. Exact types
    only, so a value survives the round trip unchanged.

    Args:
        value: the value to check.
        depth: how many containers deep ``value`` already is.

    Raises:
        _Invalid: the value is not plain data.
    """
    kind = type(value)
    if kind is float:
        _check_finite(value)
        return
    if kind in _PLAIN_SCALAR_TYPES:
        return
    if kind is not tuple and kind is not dict:
        raise _Invalid(f"{kind.__qualname__} is not plain msgpack data")
    if depth >= _MAX_ANY_DEPTH:
        raise _Invalid(f"nested more than {_MAX_ANY_DEPTH} containers deep")
    if kind is tuple:
        for index, item in enumerate(value):
            try:
                _check_plain(item, depth + 1)
            except _Invalid as invalid:
                invalid.path.append(f"[{index}]")
                raise
        return
    for key, item in value.items():
        if type(key) is not str and type(key) is not bytes:
            raise _Invalid(f"map keys must be str or bytes, got {type(key).__qualname__}")
        try:
            _check_plain(item, depth + 1)
        except _Invalid as invalid:
            invalid.path.append(f"[{_short.repr(key)}]")
            raise


def _same(value: object) -> object:
    """Returns its argument; the converter of values that need no conversion."""
    return value


def _check_finite(value: float) -> float:
    """Returns a float that is a number: NaN and the infinities are refused (NaN is not
    even equal to itself, so a message holding one is not equal to itself either)."""
    if not math.isfinite(value):
        raise _Invalid(f"expected a finite float, got {value!r}")
    return value


def _any_conversion() -> _Conversion:
    """Returns the conversion of ``typing.Any``: plain msgpack data, unchanged."""

    def convert(value: Any) -> Any:
        _check_plain(value, 0)
        return value

    return _Conversion(_NoPassthrough, convert, convert)


def _none_conversion() -> _Conversion:
    """Returns the conversion of ``None``."""

    def decode(value: Any) -> None:
        if value is not None:
            raise _Invalid(f"expected None, got {_wire_kind(value)}")

    def encode(value: Any) -> None:
        if value is not None:
            raise _Invalid(f"expected None, got {type(value).__qualname__}")

    return _Conversion(type(None), decode, encode)


def _scalar_conversion(scalar_type: type) -> _Conversion:
    """Returns the conversion of ``int``, ``float``, ``str``, ``bytes`` or ``bool``.

    Decoding wants the exact type, except that ``float`` also takes an int. Encoding
    takes subclasses too (an IntEnum for an int, say), but never a bool for a number.
    """
    name = scalar_type.__qualname__
    refuses_bool = scalar_type is int or scalar_type is float

    def decode(value: Any) -> Any:
        if type(value) is scalar_type:
            return _check_finite(value) if scalar_type is float else value
        if scalar_type is float and type(value) is int:
            return float(value)
        raise _Invalid(f"expected {name}, got {_wire_kind(value)}")

    def encode(value: Any) -> Any:
        if isinstance(value, bool) and refuses_bool:
            raise _Invalid(f"expected {name}, got bool")
        if isinstance(value, scalar_type):
            return _check_finite(value) if scalar_type is float else value
        if scalar_type is float and isinstance(value, int):
            return float(value)
        raise _Invalid(f"expected {name}, got {type(value).__qualname__}")

    # A float is checked both ways: no value of that type passes through unlooked at.
    return _Conversion(_NoPassthrough if scalar_type is float else scalar_type, decode, encode)


def _optional_conversion(inner: _Conversion) -> _Conversion:
    """Returns the conversion of ``X | None`` given that of ``X``."""
    inner_decode = inner.decode
    inner_encode = inner.encode

    def decode(value: Any) -> Any:
        return None if value is None else inner_decode(value)

    def encode(value: Any) -> Any:
        return None if value is None else inner_encode(value)

    return _Conversion(inner.passthrough, decode, encode)


def _scalar_union_conversion(members: tuple[type, ...], name: str) -> _Conversion:
    """Returns the conversion of a union of scalar types, possibly with None.

    The wire type picks the member, so the union's order only matters for an int sent
    to a union holding ``float`` but not ``int``: it becomes a float.
    """
    decoders: dict[type, Callable[[Any], Any]] = {member: _same for member in members}
    if float in decoders:
        decoders[float] = _check_finite
        if int not in decoders:
            decoders[int] = float
    fallbacks = tuple(
        _none_conversion().encode if member is type(None) else _scalar_conversion(member).encode
        for member in members
    )

    def decode(value: Any) -> Any:
        convert = decoders.get(type(value))
        if convert is None:
            raise _Invalid(f"expected {name}, got {_wire_kind(value)}")
        return convert(value)

    def encode(value: Any) -> Any:
        if type(value) in members:
            return _check_finite(value) if type(value) is float else value
        # Subclasses (an IntEnum, a StrEnum) and ints for floats end up here.
        for member_encode in fallbacks:
            try:
                return member_encode(value)
            except _Invalid:
                continue
        raise _Invalid(f"expected {name}, got {type(value).__qualname__}")

    return _Conversion(_NoPassthrough, decode, encode)


def _choice_conversion(
    choices: dict[tuple[type, object], object], encoded: dict[tuple[type, object], object], name: str
) -> _Conversion:
    """Returns the conversion of a closed set of values (a Literal or an Enum).

    Args:
        choices: maps ``(type, wire value)`` to the Python value it decodes to; keying on
            the type keeps ``True`` from passing for ``1``.
        encoded: maps ``(type, Python value)`` to the wire value it encodes to.
        name: the annotation's name, for error messages.
    """
    allowed = ", ".join(_short.repr(wire) for _, wire in choices)

    def decode(value: Any) -> Any:
        try:
            return choices[type(value), value]
        except (KeyError, TypeError):
            # TypeError: an unhashable value (a map inside an array) is no choice either.
            raise _Invalid(f"expected {name} (one of {allowed}), got {_short.repr(value)}") from None

    def encode(value: Any) -> Any:
        try:
            return encoded[type(value), value]
        except (KeyError, TypeError):
            raise _Invalid(f"expected {name}, got {_short.repr(value)}") from None

    return _Conversion(_NoPassthrough, decode, encode)


def _literal_conversion(values: tuple[object, ...], name: str) -> _Conversion:
    """Returns the conversion of ``Literal[...]``; Enum members travel as their value."""
    choices: dict[tuple[type, object], object] = {}
    encoded: dict[tuple[type, object], object] = {}
    for value in values:
        if not isinstance(value, _LITERAL_VALUE_TYPES):
            raise TypeError(f"{name}: Literal values must be int, str, bytes, bool, None or Enum")
        wire = value.value if isinstance(value, enum.Enum) else value
        if not isinstance(wire, _ENUM_VALUE_TYPES):
            raise TypeError(f"{name}: the Enum values in a Literal must be scalars")
        choices[type(wire), wire] = value
        encoded[type(value), value] = wire
    return _choice_conversion(choices, encoded, name)


def _enum_conversion(enum_type: type[enum.Enum]) -> _Conversion:
    """Returns the conversion of an Enum: members travel as their value."""
    name = enum_type.__qualname__
    if issubclass(enum_type, enum.Flag):
        raise TypeError(f"{name}: Flag enums are not supported (combined flags are no members)")
    choices: dict[tuple[type, object], object] = {}
    encoded: dict[tuple[type, object], object] = {}
    for member in enum_type:
        if type(member.value) not in _ENUM_VALUE_TYPES:
            raise TypeError(f"{name}.{member.name}: Enum values must be int, float, str, bytes, bool or None")
        choices[type(member.value), member.value] = member
        encoded[enum_type, member] = member.value
    return _choice_conversion(choices, encoded, name)


def _sequence_conversion(
    item: _Conversion, name: str, python_type: type, accepted: tuple[type[Any], ...]
) -> _Conversion:
    """Returns the conversion of ``tuple[X, ...]``, ``list[X]`` or ``frozenset[X]``.

    Args:
        item: the conversion of the items.
        name: the annotation's name, for error messages.
        python_type: what decoding builds from the msgpack array.
        accepted: the types encoding accepts.
    """
    passthrough = item.passthrough
    item_decode = item.decode
    item_encode = item.encode

    def convert_items(values: Any, convert: Callable[[Any], Any]) -> list[object]:
        converted = []
        for index, value in enumerate(values):
            if type(value) is passthrough:
                converted.append(value)
                continue
            try:
                converted.append(convert(value))
            except _Invalid as invalid:
                invalid.path.append(f"[{index}]")
                raise
        return converted

    def decode(value: Any) -> Any:
        if type(value) is not tuple:
            raise _Invalid(f"expected {name}, got {_wire_kind(value)}")
        if all(type(entry) is passthrough for entry in value):
            items: Any = value
        else:
            items = convert_items(value, item_decode)
        if python_type is tuple:
            return items if type(items) is tuple else tuple(items)
        if python_type is list:
            return items if type(items) is list else list(items)
        try:
            return frozenset(items)
        except TypeError as error:
            raise _Invalid(f"items of {name} must be hashable: {error}") from error

    def encode(value: Any) -> Any:
        if not isinstance(value, accepted):
            raise _Invalid(f"expected {name}, got {type(value).__qualname__}")
        if all(type(entry) is passthrough for entry in value):
            return value if python_type is not frozenset else tuple(value)
        return convert_items(value, item_encode)

    return _Conversion(_NoPassthrough, decode, encode)


def _fixed_tuple_conversion(items: tuple[_Conversion, ...], name: str) -> _Conversion:
    """Returns the conversion of a fixed-length tuple such as ``tuple[str, int]``."""
    length = len(items)

    def convert(value: Any, decoding: bool) -> tuple[object, ...]:
        converted = []
        for index, (entry, conversion) in enumerate(zip(value, items)):
            if type(entry) is conversion.passthrough:
                converted.append(entry)
                continue
            try:
                converted.append(conversion.decode(entry) if decoding else conversion.encode(entry))
            except _Invalid as invalid:
                invalid.path.append(f"[{index}]")
                raise
        return tuple(converted)

    def decode(value: Any) -> Any:
        if type(value) is not tuple or len(value) != length:
            got = _wire_kind(value)
            if type(value) is tuple:
                got = f"array of {len(value)}"
            raise _Invalid(f"expected {name}, got {got}")
        return convert(value, decoding=True)

    def encode(value: Any) -> Any:
        if not isinstance(value, tuple) or len(value) != length:
            raise _Invalid(f"expected {name}, got {_short.repr(value)}")
        return convert(value, decoding=False)

    return _Conversion(_NoPassthrough, decode, encode)


def _dict_conversion(key_type: type, value: _Conversion, name: str) -> _Conversion:
    """Returns the conversion of ``dict[str, V]`` or ``dict[bytes, V]``."""
    passthrough = value.passthrough
    value_decode = value.decode
    value_encode = value.encode
    key_name = key_type.__qualname__

    def convert(mapping: Any, convert_value: Callable[[Any], Any], decoding: bool) -> dict[object, object]:
        converted = {}
        for key, item in mapping.items():
            if type(key) is not key_type and (decoding or not isinstance(key, key_type)):
                got = _wire_kind(key) if decoding else type(key).__qualname__
                raise _Invalid(f"keys of {name} must be {key_name}, got {got}")
            if type(item) is not passthrough:
                try:
                    item = convert_value(item)
                except _Invalid as invalid:
                    invalid.path.append(f"[{_short.repr(key)}]")
                    raise
            converted[key] = item
        return converted

    def decode(mapping: Any) -> Any:
        if type(mapping) is not dict:
            raise _Invalid(f"expected {name}, got {_wire_kind(mapping)}")
        return convert(mapping, value_decode, decoding=True)

    def encode(mapping: Any) -> Any:
        if not isinstance(mapping, dict):
            raise _Invalid(f"expected {name}, got {type(mapping).__qualname__}")
        return convert(mapping, value_encode, decoding=False)

    return _Conversion(_NoPassthrough, decode, encode)


def _nested_conversion(message_type: _MessageType) -> _Conversion:
    """Returns the conversion of a registered dataclass nested in another: its body map."""
    nested_type = message_type.cls

    def decode(value: Any) -> Any:
        return _build(message_type, value)

    def encode(value: Any) -> Any:
        if type(value) is not nested_type:
            raise _Invalid(f"expected {nested_type.__qualname__}, got {type(value).__qualname__}")
        return _encode_body(message_type, value)

    return _Conversion(_NoPassthrough, decode, encode)


def _build(message_type: _MessageType, body: Any) -> object:
    """Builds a message from its decoded body map.

    Raises:
        _Invalid: the body does not fit the message type, or the dataclass (its
            ``__post_init__``) refused the values with ValueError or TypeError.
    """
    if type(body) is not dict:
        raise _Invalid(f"expected a map of fields, got {_wire_kind(body)}")
    values = {}
    for name, passthrough, decode, _, required in message_type.fields:
        value = body.get(name, _ABSENT)
        if type(value) is passthrough:
            values[name] = value
        elif value is _ABSENT:
            if required:
                invalid = _Invalid("required field is missing")
                invalid.path.append(f".{name}")
                raise invalid
        else:
            try:
                values[name] = decode(value)
            except _Invalid as invalid:
                invalid.path.append(f".{name}")
                raise
    # Every field found is one key of the body, so a longer body has keys we do not know.
    if len(values) != len(body):
        for key in body:
            if type(key) is not str:
                raise _Invalid(f"field names must be str, got {_wire_kind(key)} {_short.repr(key)}")
            if key not in message_type.names:
                raise _Invalid(f"unknown field {_short.repr(key)}")
    try:
        return message_type.cls(**values)
    except (ValueError, TypeError) as error:
        raise _Invalid(f"rejected by {message_type.cls.__qualname__}: {error}") from error


def _encode_body(message_type: _MessageType, message: object) -> dict[str, object]:
    """Returns the body map of a message.

    Raises:
        _Invalid: a field value does not fit its annotation.
    """
    body = {}
    for name, passthrough, _, encode, _ in message_type.fields:
        value = getattr(message, name)
        if type(value) is not passthrough:
            try:
                value = encode(value)
            except _Invalid as invalid:
                invalid.path.append(f".{name}")
                raise
        body[name] = value
    return body


class Codec:
    """Encodes registered dataclass messages as msgpack frames, and decodes them.

    Register every message type, on both sides, before the first frame goes through::

        codec = Codec()

        @codec.message("session.offer")
        @dataclass(frozen=True)
        class Offer:
            session_id: str
            sdp: str

        frame = codec.encode(Offer("s1", "v=0"))
        assert codec.decode(frame) == Offer("s1", "v=0")

    Encoding and decoding are safe from several threads at once; registering is meant
    to be done before either starts.
    """

    def __init__(self, *, version: int = 1, max_frame_bytes: int = 1 << 20) -> None:
        """Creates a codec with no message types.

        Args:
            version: the envelope version this side writes and the only one it reads.
            max_frame_bytes: the largest frame ``encode`` produces and ``decode`` accepts.

        Raises:
            TypeError: an argument is not an int.
            ValueError: ``version`` is negative or ``max_frame_bytes`` is not positive.
        """
        if type(version) is not int or type(max_frame_bytes) is not int:
            raise TypeError("version and max_frame_bytes must be ints")
        if version < 0:
            raise ValueError(f"version must not be negative, got {version}")
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self._version = version
        self._max_frame_bytes = max_frame_bytes
        self._by_tag: dict[str, _MessageType] = {}
        self._by_class: dict[type, _MessageType] = {}

    @property
    def version(self) -> int:
        """The envelope version this codec writes and accepts."""
        return self._version

    @property
    def max_frame_bytes(self) -> int:
        """The size limit of a frame, in bytes, in both directions."""
        return self._max_frame_bytes

    @property
    def tags(self) -> frozenset[str]:
        """The tags of every registered message type."""
        return frozenset(self._by_tag)

    def tag_of(self, cls: type) -> str:
        """Returns the tag a registered class travels under.

        Raises:
            KeyError: ``cls`` is not registered with this codec.
        """
        return self._by_class[cls].tag

    def register(self, cls: type[T], tag: str | None = None) -> type[T]:
        """Registers a dataclass as a message type.

        A field annotated with another dataclass needs that dataclass registered first,
        which also rules out recursive message types.

        Args:
            cls: a dataclass (frozen is recommended). Fields with ``init=False`` do not
                travel; fields with a default may be missing from a frame.
            tag: the name the type travels under; defaults to ``cls.__qualname__``.

        Returns:
            ``cls`` itself, so that ``register`` can serve as a decorator.

        Raises:
            TypeError: ``cls`` is not a dataclass, ``tag`` is not a str, or a field's
                annotation is not supported (the message names the class and field).
            ValueError: ``tag`` is empty or already taken, or ``cls`` is already registered.
        """
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise TypeError(f"only dataclasses can be registered, got {cls!r}")
        if tag is None:
            tag = cls.__qualname__
        if not isinstance(tag, str):
            raise TypeError(f"tag must be a str, got {type(tag).__qualname__}")
        if not tag:
            raise ValueError("tag must not be empty")
        if tag in self._by_tag:
            raise ValueError(f"tag {tag!r} is already taken by {self._by_tag[tag].cls.__qualname__}")
        if cls in self._by_class:
            raise ValueError(f"{cls.__qualname__} is already registered as {self._by_class[cls].tag!r}")
        try:
            hints = typing.get_type_hints(cls)
        except Exception as error:
            # get_type_hints evaluates arbitrary annotation strings: NameError is the
            # usual failure, but any exception means the same thing here.
            raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {error}") from error
        fields = []
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            try:
                conversion = self._compile(hints[field.name])
            except TypeError as error:
                raise TypeError(f"{cls.__qualname__}.{field.name}: {error}") from error
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            fields.append((field.name, conversion.passthrough, conversion.decode, conversion.encode, required))
        for name, hint in hints.items():
            if isinstance(hint, dataclasses.InitVar):
                raise TypeError(f"{cls.__qualname__}.{name}: InitVar fields are not supported")
        message_type = _MessageType(
            cls=cls,
            tag=tag,
            fields=tuple(fields),
            names=frozenset(field[0] for field in fields),
        )
        self._by_tag[tag] = message_type
        self._by_class[cls] = message_type
        return cls

    def message(self, tag: str) -> Callable[[type[T]], type[T]]:
        """Returns a class decorator that registers the class under ``tag``.

        Apply it above ``@dataclass``, so that it receives the finished dataclass.

        Args:
            tag: the name the type travels under.

        Returns:
            A decorator that calls ``register(cls, tag)`` and returns ``cls``.
        """

        def decorate(cls: type[T]) -> type[T]:
            return self.register(cls, tag)

        return decorate

    def encode(self, message: object) -> bytes:
        """Encodes a message as one frame.

        Args:
            message: an instance of a registered class (not of a subclass of one).

        Returns:
            The msgpack frame ``[version, tag, body]``.

        Raises:
            TypeError: ``message`` is not of a registered class, or one of its field
                values does not fit the field's annotation.
            ValueError: the frame would be larger than ``max_frame_bytes``.
            OverflowError: an int does not fit in 64 bits.
        """
        message_type = self._by_class.get(type(message))
        if message_type is None:
            raise TypeError(f"{type(message).__qualname__} is not a registered message type")
        try:
            body = _encode_body(message_type, message)
        except _Invalid as invalid:
            raise TypeError(f"cannot encode {message_type.tag!r}: {invalid.describe()}") from invalid.__cause__
        frame: bytes = _packers.packer.pack((self._version, message_type.tag, body))
        if len(frame) > self._max_frame_bytes:
            raise ValueError(
                f"{message_type.tag!r} encodes to {len(frame)} bytes, over the limit of {self._max_frame_bytes}"
            )
        return frame

    def decode(self, frame: bytes | bytearray | memoryview) -> object:
        """Decodes one frame into a message.

        Args:
            frame: exactly one frame, as produced by ``encode`` on a codec that speaks the
                same version and has the same message types.

        Returns:
            An instance of the registered class the frame's tag names.

        Raises:
            DecodeError: the frame is not one this codec accepts; this is the only
                exception any bytes can cause, and a frame that is not bytes (a
                WebSocket text frame, say) is refused the same way.
        """
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise DecodeError(f"a frame is bytes, not {type(frame).__name__}")
        size = frame.nbytes if type(frame) is memoryview else len(frame)
        if size > self._max_frame_bytes:
            raise DecodeError(f"frame of {size} bytes is over the limit of {self._max_frame_bytes}")
        try:
            # unpackb bounds every str, bin, array and map length by the frame's length,
            # which is already within max_frame_bytes. max_ext_len=0 refuses the ext
            # types unpackb decodes itself (timestamps); ext_hook refuses the others.
            envelope = msgpack.unpackb(
                frame,
                raw=False,
                use_list=False,
                strict_map_key=True,
                max_ext_len=0,
                ext_hook=_refuse_ext,
            )
        except ValueError as error:
            raise DecodeError(_describe_unpack_failure(error)) from error
        if type(envelope) is not tuple or len(envelope) != 3:
            got = f"array of {len(envelope)}" if type(envelope) is tuple else _wire_kind(envelope)
            raise DecodeError(f"envelope must be an array [version, tag, body], got {got}")
        version, tag, body = envelope
        if type(version) is not int or version != self._version:
            raise DecodeError(f"unsupported envelope version {_short.repr(version)}; this side speaks {self._version}")
        if type(tag) is not str:
            raise DecodeError(f"envelope tag must be a str, got {_wire_kind(tag)}")
        message_type = self._by_tag.get(tag)
        if message_type is None:
            raise DecodeError(f"unknown message tag {_short.repr(tag)}")
        try:
            return _build(message_type, body)
        except _Invalid as invalid:
            raise DecodeError(f"{tag!r}: {invalid.describe()}") from invalid.__cause__

    def _compile(self, hint: object) -> _Conversion:
        """Returns the conversion of one annotation.

        Raises:
            TypeError: the annotation is not supported.
        """
        if hint is Any:
            return _any_conversion()
        if hint in _SCALAR_TYPES:
            return _scalar_conversion(hint)
        if hint is type(None) or hint is None:
            return _none_conversion()
        if isinstance(hint, typing.NewType):
            return self._compile(hint.__supertype__)
        name = _annotation_name(hint)
        if isinstance(hint, type):
            if issubclass(hint, enum.Enum):
                return _enum_conversion(hint)
            if dataclasses.is_dataclass(hint):
                nested = self._by_class.get(hint)
                if nested is None:
                    raise TypeError(f"dataclass {name} is not registered with this codec; register it first")
                return _nested_conversion(nested)
            raise TypeError(f"unsupported annotation {name}")
        origin = typing.get_origin(hint)
        arguments = typing.get_args(hint)
        if origin is typing.Union or origin is types.UnionType:
            return self._compile_union(arguments, name)
        if origin is typing.Literal:
            return _literal_conversion(arguments, name)
        if origin is tuple:
            if len(arguments) == 2 and arguments[1] is Ellipsis:
                return _sequence_conversion(self._compile(arguments[0]), name, tuple, (tuple,))
            return _fixed_tuple_conversion(tuple(self._compile(argument) for argument in arguments), name)
        if origin is list:
            return _sequence_conversion(self._compile(arguments[0]), name, list, (list,))
        if origin is frozenset:
            return _sequence_conversion(self._compile(arguments[0]), name, frozenset, (frozenset, set))
        if origin is dict:
            key_type, value_type = arguments
            if key_type is not str and key_type is not bytes:
                raise TypeError(f"unsupported annotation {name}: dict keys must be str or bytes")
            return _dict_conversion(key_type, self._compile(value_type), name)
        raise TypeError(f"unsupported annotation {name}")

    def _compile_union(self, members: tuple[Any, ...], name: str) -> _Conversion:
        """Returns the conversion of a union.

        Supported: ``X | None`` for any supported ``X``, and unions of scalar types
        (int, float, str, bytes, bool, None). Other unions could match one wire value
        in more than one way, so they are refused.

        Raises:
            TypeError: the union is not supported.
        """
        others = tuple(member for member in members if member is not type(None))
        if len(others) == 1:
            return _optional_conversion(self._compile(others[0]))
        if all(member in _SCALAR_TYPES or member is type(None) for member in members):
            return _scalar_union_conversion(members, name)
        raise TypeError(
            f"unsupported annotation {name}: a union must be X | None, or of int, float, str, bytes, bool and None"
        )
