"""Tests of the msgpack message codec: round trips, registration, and hostile frames."""

import dataclasses
import enum
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, Optional, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors._codec import Codec
from actors._errors import DecodeError

M = TypeVar("M")
SessionId = NewType("SessionId", str)


class Color(enum.Enum):
    RED = "red"
    GREEN = 2


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


codec = Codec()


@codec.message("test.point")
@dataclass(frozen=True)
class Point:
    x: float
    y: float = 0.0


@codec.message("test.offer")
@dataclass(frozen=True)
class Offer:
    session_id: SessionId
    sdp: str
    sequence: int
    urgent: bool = False


@codec.message("test.checked")
@dataclass(frozen=True)
class Checked:
    """Refuses negative counts, the way a message validates itself."""

    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


@codec.message("test.everything")
@dataclass(frozen=True)
class Everything:
    number: int
    ratio: float
    text: str
    blob: bytes
    flag: bool
    nothing: None
    maybe_number: int | None
    maybe_text: Optional[str]
    scalar_union: int | str | bytes | None
    numbers: tuple[int, ...]
    pair: tuple[str, int]
    empty: tuple[()]
    points: list[Point]
    by_name: dict[str, Point]
    by_key: dict[bytes, int]
    names: frozenset[str]
    mode: Literal["fast", "slow", 3]
    color: Color
    priority: Priority
    anything: Any
    origin: Point
    maybe_point: Point | None = None
    checked: tuple[Checked, ...] = ()
    note: str = "none"
    labels: tuple[str, ...] = field(default_factory=tuple)


def make_everything(**changes: Any) -> Everything:
    values: dict[str, Any] = dict(
        number=-(2**63),
        ratio=2.5,
        text="héllo ✓",
        blob=b"\x00\xff",
        flag=True,
        nothing=None,
        maybe_number=None,
        maybe_text="set",
        scalar_union=b"raw",
        numbers=(1, 2, 2**64 - 1),
        pair=("a", 1),
        empty=(),
        points=[Point(1.0), Point(2.0, -3.5)],
        by_name={"home": Point(0.0, 0.0)},
        by_key={b"k": 7},
        names=frozenset({"a", "b"}),
        mode=3,
        color=Color.GREEN,
        priority=Priority.HIGH,
        anything=(None, True, 1, 1.5, "s", b"b", (), {"k": ({b"x": 0},)}),
        origin=Point(-1.0, 1.0),
        maybe_point=Point(9.0),
        checked=(Checked(1), Checked(0)),
        labels=("x", "y"),
    )
    values.update(changes)
    return Everything(**values)


REGISTERED_TYPES = (Point, Offer, Checked, Everything)


def frame(*envelope: Any) -> bytes:
    """Packs an envelope by hand, the way a (possibly hostile) peer could."""
    return msgpack.packb(list(envelope), use_bin_type=True)


def offer_body(**changes: Any) -> dict[Any, Any]:
    body: dict[Any, Any] = {"session_id": "s1", "sdp": "v=0", "sequence": 1, "urgent": False}
    body.update(changes)
    return body


def everything_body(**changes: Any) -> dict[Any, Any]:
    body = msgpack.unpackb(codec.encode(make_everything()))[2]
    body.update(changes)
    return body


def decode_as(cls: type[M], data: bytes, decoder: Codec = codec) -> M:
    message = decoder.decode(data)
    assert isinstance(message, cls)
    return message


def decode_error(data: bytes | memoryview, decoder: Codec = codec) -> str:
    with pytest.raises(DecodeError) as caught:
        decoder.decode(data)
    return str(caught.value)


# Round trips


def test_every_supported_field_type_round_trips() -> None:
    message = make_everything()
    decoded = decode_as(Everything, codec.encode(message))
    assert decoded == message
    assert type(decoded.points) is list
    assert type(decoded.names) is frozenset
    assert decoded.color is Color.GREEN
    assert decoded.priority is Priority.HIGH
    assert type(decoded.ratio) is float


def test_envelope_is_version_tag_and_body_map() -> None:
    version, tag, body = msgpack.unpackb(codec.encode(Offer(SessionId("s1"), "v=0", 7)))
    assert (version, tag) == (1, "test.offer")
    assert body == {"session_id": "s1", "sdp": "v=0", "sequence": 7, "urgent": False}


def test_enums_nested_dataclasses_and_sets_travel_as_plain_values() -> None:
    body = msgpack.unpackb(codec.encode(make_everything()))[2]
    assert body["color"] == 2
    assert body["priority"] == 2
    assert body["origin"] == {"x": -1.0, "y": 1.0}
    assert sorted(body["names"]) == ["a", "b"]
    assert body["pair"] == ["a", 1]


def test_missing_fields_with_defaults_take_the_default() -> None:
    body = everything_body()
    for name in ("maybe_point", "checked", "note", "labels"):
        del body[name]
    decoded = decode_as(Everything, frame(1, "test.everything", body))
    assert decoded.maybe_point is None
    assert decoded.checked == ()
    assert decoded.note == "none"
    assert decoded.labels == ()
    assert codec.decode(frame(1, "test.point", {"x": 1.0})) == Point(1.0, 0.0)


def test_float_fields_accept_ints_and_return_floats() -> None:
    decoded = decode_as(Point, frame(1, "test.point", {"x": 3, "y": -2}))
    assert decoded == Point(3.0, -2.0)
    assert type(decoded.x) is float
    assert type(decode_as(Point, codec.encode(Point(5))).x) is float


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_float_is_a_finite_number_in_typed_and_any_fields(value: float) -> None:
    # NaN is not equal to itself: a message holding one is not equal to its own decoding.
    with pytest.raises(DecodeError, match="expected a finite float"):
        codec.decode(frame(1, "test.point", {"x": value}))
    for changes in ({"ratio": value}, {"anything": (1, value)}):
        with pytest.raises(TypeError, match="expected a finite float"):
            codec.encode(make_everything(**changes))
    body = msgpack.unpackb(codec.encode(make_everything()))[2]
    for name, wrong in (("ratio", value), ("anything", [value])):
        with pytest.raises(DecodeError, match="expected a finite float"):
            codec.decode(frame(1, "test.everything", dict(body, **{name: wrong})))


@pytest.mark.parametrize("value", [None, 5, "five", b"five"])
def test_scalar_unions_round_trip_each_member(value: object) -> None:
    message = make_everything(scalar_union=value)
    assert decode_as(Everything, codec.encode(message)).scalar_union == value


def test_decode_takes_bytearray_and_memoryview() -> None:
    data = codec.encode(Offer(SessionId("s1"), "v=0", 1))
    assert codec.decode(bytearray(data)) == codec.decode(memoryview(data)) == codec.decode(data)


def test_tag_defaults_to_qualified_class_name() -> None:
    local = Codec()

    @dataclass(frozen=True)
    class Ping:
        number: int

    assert local.register(Ping) is Ping
    assert local.tags == frozenset({Ping.__qualname__})
    assert local.tag_of(Ping) == Ping.__qualname__
    assert local.decode(local.encode(Ping(3))) == Ping(3)


def test_tags_lists_registered_types() -> None:
    assert codec.tags == frozenset({"test.point", "test.offer", "test.checked", "test.everything"})


def test_fields_without_init_do_not_travel() -> None:
    local = Codec()

    @local.message("derived")
    @dataclass(frozen=True)
    class Derived:
        base: int
        double: int = field(init=False)

        def __post_init__(self) -> None:
            object.__setattr__(self, "double", self.base * 2)

    data = local.encode(Derived(4))
    assert msgpack.unpackb(data)[2] == {"base": 4}
    assert decode_as(Derived, data, local).double == 8


def test_encode_is_consistent_across_threads() -> None:
    messages = [Offer(SessionId(f"s{index}"), "v=0" * index, index) for index in range(50)]
    expected = [codec.encode(message) for message in messages]
    failures = []

    def encode_all() -> None:
        for _ in range(20):
            if [codec.encode(message) for message in messages] != expected:
                failures.append(True)

    threads = [threading.Thread(target=encode_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


# Decode errors


def test_unknown_tag() -> None:
    assert "unknown message tag 'test.nope'" in decode_error(frame(1, "test.nope", {}))


def test_tag_that_is_not_a_str() -> None:
    assert "tag must be a str" in decode_error(frame(1, 7, {}))
    assert "tag must be a str" in decode_error(frame(1, {"a": 1}, {}))


def test_wrong_version() -> None:
    message = decode_error(frame(2, "test.point", {"x": 1.0}))
    assert message == "unsupported envelope version 2; this side speaks 1"
    assert "unsupported envelope version True" in decode_error(frame(True, "test.point", {"x": 1.0}))
    newer = Codec(version=2)
    newer.register(Point, "test.point")
    assert "this side speaks 2" in decode_error(codec.encode(Point(1.0)), newer)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb(5),
        msgpack.packb({"version": 1}),
        msgpack.packb([1, "test.point"]),
        msgpack.packb([1, "test.point", {"x": 1.0}, None]),
    ],
)
def test_envelope_that_is_not_an_array_of_three(data: bytes) -> None:
    assert "envelope must be an array" in decode_error(data)


def test_body_that_is_not_a_map() -> None:
    assert "expected a map of fields, got array" in decode_error(frame(1, "test.point", [1.0, 2.0]))


def test_every_truncation_of_a_valid_frame() -> None:
    data = codec.encode(make_everything())
    for length in range(len(data)):
        decode_error(data[:length])


def test_trailing_bytes() -> None:
    data = codec.encode(Point(1.0))
    assert decode_error(data + b"\x00") == "trailing bytes after the envelope"
    assert decode_error(data + data) == "trailing bytes after the envelope"


def test_oversized_frame_is_refused_before_unpacking() -> None:
    small = Codec(max_frame_bytes=64)
    small.register(Offer, "test.offer")
    message = decode_error(b"\xc1" * 65, small)
    assert message == "frame of 65 bytes is over the limit of 64"
    assert "over the limit" in decode_error(codec.encode(Offer(SessionId("s1"), "v" * 40, 1)), small)
    assert "over the limit" in decode_error(memoryview(b"\xc1" * 65), small)


def test_wrongly_typed_field() -> None:
    message = decode_error(frame(1, "test.offer", offer_body(sdp=5)))
    assert message == "'test.offer': field sdp: expected str, got int"


def test_bool_is_not_an_int() -> None:
    assert "field sequence: expected int, got bool" in decode_error(frame(1, "test.offer", offer_body(sequence=True)))
    assert "field x: expected float, got bool" in decode_error(frame(1, "test.point", {"x": False}))


def test_missing_required_field() -> None:
    body = offer_body()
    del body["sdp"]
    assert decode_error(frame(1, "test.offer", body)) == "'test.offer': field sdp: required field is missing"


def test_unknown_extra_field() -> None:
    message = decode_error(frame(1, "test.offer", offer_body(extra=1)))
    assert message == "'test.offer': unknown field 'extra'"


def test_field_name_that_is_not_a_str() -> None:
    body = offer_body()
    body[b"sdp"] = "v=0"
    assert "field names must be str, got bin" in decode_error(frame(1, "test.offer", body))
    body = offer_body()
    body[5] = "v=0"
    assert "int is not allowed for map key" in decode_error(frame(1, "test.offer", body))


def test_errors_name_the_path_to_nested_fields() -> None:
    message = decode_error(frame(1, "test.everything", everything_body(points=[{"x": 1.0}, {"x": "one"}])))
    assert message == "'test.everything': field points[1].x: expected float, got str"
    message = decode_error(frame(1, "test.everything", everything_body(by_name={"home": {"x": 1.0, "z": 2}})))
    assert message == "'test.everything': field by_name['home']: unknown field 'z'"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"number": 1.0}, "field number: expected int, got float"),
        ({"ratio": "1"}, "field ratio: expected float, got str"),
        ({"blob": "text"}, "field blob: expected bytes, got str"),
        ({"text": b"bin"}, "field text: expected str, got bin"),
        ({"flag": 1}, "field flag: expected bool, got int"),
        ({"nothing": 0}, "field nothing: expected None, got int"),
        ({"maybe_number": "1"}, "field maybe_number: expected int, got str"),
        ({"scalar_union": 1.5}, "field scalar_union: expected int | str | bytes | None, got float"),
        ({"numbers": [1, "2"]}, "field numbers[1]: expected int, got str"),
        ({"numbers": {"a": 1}}, "field numbers: expected tuple[int, ...], got map"),
        ({"pair": ["a"]}, "field pair: expected tuple[str, int], got array of 1"),
        ({"pair": [1, 1]}, "field pair[0]: expected str, got int"),
        ({"empty": [1]}, "field empty: expected tuple[()], got array of 1"),
        ({"by_name": {"home": [1.0]}}, "field by_name['home']: expected a map of fields, got array"),
        ({"by_key": {"k": 1}}, "field by_key: keys of dict[bytes, int] must be bytes, got str"),
        ({"names": [["a"]]}, "field names[0]: expected str, got array"),
        ({"mode": "medium"}, "field mode: expected Literal['fast', 'slow', 3]"),
        ({"mode": True}, "field mode: expected Literal['fast', 'slow', 3]"),
        ({"color": "GREEN"}, "field color: expected Color (one of 'red', 2), got 'GREEN'"),
        ({"color": [2]}, "field color: expected Color"),
        ({"priority": 3}, "field priority: expected Priority"),
        ({"origin": None}, "field origin: expected a map of fields, got nil"),
        ({"maybe_point": {"y": 1.0}}, "field maybe_point.x: required field is missing"),
    ],
)
def test_each_wrong_value_names_tag_and_field(changes: dict[str, Any], expected: str) -> None:
    message = decode_error(frame(1, "test.everything", everything_body(**changes)))
    assert message.startswith("'test.everything': ")
    assert expected in message


def test_post_init_refusal_is_a_decode_error_chained_to_the_cause() -> None:
    with pytest.raises(DecodeError, match="rejected by Checked: count must not be negative") as caught:
        codec.decode(frame(1, "test.checked", {"count": -1}))
    assert isinstance(caught.value.__cause__, ValueError)
    message = decode_error(frame(1, "test.everything", everything_body(checked=[{"count": 1}, {"count": -1}])))
    assert "field checked[1]: rejected by Checked" in message


def test_ext_types_are_refused() -> None:
    for value in (msgpack.ExtType(5, b"data"), msgpack.ExtType(5, b""), msgpack.Timestamp(1, 0)):
        data = msgpack.packb([1, "test.everything", everything_body(anything=value)], use_bin_type=True)
        assert "ext types are not accepted" in decode_error(data)


def test_invalid_utf8_is_refused() -> None:
    data = frame(1, "test.offer", offer_body(sdp="PLACEHOLDER"))
    broken = data.replace(b"PLACEHOLDER", b"\xffLACEHOLDER")
    with pytest.raises(DecodeError, match="invalid UTF-8") as caught:
        codec.decode(broken)
    assert isinstance(caught.value.__cause__, UnicodeDecodeError)


def test_nesting_too_deep() -> None:
    assert decode_error(b"\x91" * 5000 + b"\x01") == "nesting too deep"
    deep: Any = 0
    for _ in range(70):
        deep = [deep]
    assert "nested more than 64 containers deep" in decode_error(
        frame(1, "test.everything", everything_body(anything=deep))
    )


def test_not_msgpack_at_all() -> None:
    assert decode_error(b"\xc1") == "not valid msgpack"
    decode_error(b"")


# Encode and registration errors


def test_encode_of_an_unregistered_object() -> None:
    @dataclass(frozen=True)
    class Stranger:
        number: int

    with pytest.raises(TypeError, match="not a registered message type"):
        codec.encode(Stranger(1))
    with pytest.raises(TypeError):
        codec.encode({"x": 1.0})


def test_encode_of_a_subclass_of_a_registered_class() -> None:
    @dataclass(frozen=True)
    class SpecialPoint(Point):
        pass

    with pytest.raises(TypeError, match="not a registered message type"):
        codec.encode(SpecialPoint(1.0))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"number": "1"}, "field number: expected int, got str"),
        ({"number": True}, "field number: expected int, got bool"),
        ({"numbers": [1, 2]}, "field numbers: expected tuple[int, ...], got list"),
        ({"points": [Point(1.0), (1.0, 2.0)]}, "field points[1]: expected Point, got tuple"),
        ({"anything": [1]}, "field anything: list is not plain msgpack data"),
        ({"anything": {1: "a"}}, "field anything: map keys must be str or bytes, got int"),
        ({"color": "red"}, "field color: expected Color"),
        ({"mode": "medium"}, "field mode: expected Literal"),
    ],
)
def test_encode_of_a_wrongly_typed_field(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(TypeError) as caught:
        codec.encode(make_everything(**changes))
    assert str(caught.value).startswith("cannot encode 'test.everything': ")
    assert expected in str(caught.value)


def test_encode_converts_where_python_allows_more_than_the_wire() -> None:
    message = make_everything(ratio=2, names={"a"}, number=Priority.LOW)
    decoded = decode_as(Everything, codec.encode(message))
    assert decoded.ratio == 2.0 and type(decoded.ratio) is float
    assert decoded.names == frozenset({"a"})
    assert decoded.number == 1 and type(decoded.number) is int


def test_encode_of_an_oversized_frame() -> None:
    small = Codec(max_frame_bytes=64)
    small.register(Offer, "test.offer")
    assert small.encode(Offer(SessionId("s"), "v", 1))
    with pytest.raises(ValueError, match="over the limit of 64"):
        small.encode(Offer(SessionId("s"), "v" * 40, 1))


def test_register_refuses_what_is_not_a_dataclass() -> None:
    class Plain:
        number: int

    local = Codec()
    with pytest.raises(TypeError, match="only dataclasses"):
        local.register(Plain)
    with pytest.raises(TypeError, match="only dataclasses"):
        local.register(Point(1.0))  # type: ignore[arg-type]


def test_register_refuses_a_taken_tag_and_a_second_registration() -> None:
    @dataclass(frozen=True)
    class First:
        number: int

    @dataclass(frozen=True)
    class Second:
        number: int

    local = Codec()
    local.register(First, "same")
    with pytest.raises(ValueError, match="already taken"):
        local.register(Second, "same")
    with pytest.raises(ValueError, match="already registered"):
        local.register(First, "other")
    assert local.tags == frozenset({"same"})


@dataclass(frozen=True)
class Unregistered:
    number: int


@dataclass(frozen=True)
class Tree:
    children: tuple["Tree", ...]


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (set[int], "unsupported annotation set[int]"),
        (list, "unsupported annotation list"),
        (object, "unsupported annotation object"),
        (dict[int, str], "dict keys must be str or bytes"),
        (Unregistered, "dataclass Unregistered is not registered"),
        (Point | Offer, "a union must be"),
        (int | list[int], "a union must be"),
        (tuple[set[int], ...], "unsupported annotation set[int]"),
        (enum.Flag("Permission", "READ WRITE"), "Flag enums are not supported"),
        (Literal[1.5], "Literal values must be"),
    ],
)
def test_register_refuses_unsupported_annotations(annotation: Any, expected: str) -> None:
    local_class = dataclasses.make_dataclass("Holder", [("payload", annotation)], frozen=True)
    local = Codec()
    local.register(Point)
    with pytest.raises(TypeError) as caught:
        local.register(local_class)
    assert str(caught.value).startswith("Holder.payload: ")
    assert expected in str(caught.value)
    assert local.tags == frozenset({"Point"})


def test_register_refuses_init_vars_and_recursive_types() -> None:
    local = Codec()

    @dataclass(frozen=True)
    class WithInitVar:
        number: int
        seed: dataclasses.InitVar[int] = 0

    with pytest.raises(TypeError, match="InitVar"):
        local.register(WithInitVar)
    with pytest.raises(TypeError, match=r"Tree.children: dataclass Tree is not registered"):
        local.register(Tree)

    @dataclass(frozen=True)
    class LocalTree:
        children: tuple["LocalTree", ...]

    with pytest.raises(TypeError, match="cannot resolve the annotations of"):
        local.register(LocalTree)
    assert local.tags == frozenset()


def test_codec_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        Codec(max_frame_bytes=0)
    with pytest.raises(ValueError):
        Codec(version=-1)
    with pytest.raises(TypeError):
        Codec(version=True)


# Hostile input, generated


def assert_decodes_or_refuses(data: bytes) -> None:
    """The codec's promise: any bytes give a registered message or a DecodeError."""
    try:
        message = codec.decode(data)
    except DecodeError:
        return
    assert type(message) in REGISTERED_TYPES


VALID_FRAMES = [
    codec.encode(make_everything()),
    codec.encode(make_everything(maybe_point=None, anything={"a": (1, 2.5)}, scalar_union="s")),
    codec.encode(Offer(SessionId("s1"), "v=0", 1, urgent=True)),
    codec.encode(Point(1.0, 2.0)),
    codec.encode(Checked(3)),
]

FIELD_NAMES = sorted(
    {field.name for cls in REGISTERED_TYPES for field in dataclasses.fields(cls)} | {"extra"}
)

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
)

ext_values = st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=4)) | st.builds(
    msgpack.Timestamp, st.integers(min_value=0, max_value=2**34 - 1)
)

map_keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=5) | st.binary(max_size=3)


def msgpack_trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(map_keys, children, max_size=4),
        max_leaves=20,
    )


plain_values = msgpack_trees(plain_scalars)
msgpack_values = msgpack_trees(plain_scalars | ext_values)

VALID_ENVELOPES = [msgpack.unpackb(data) for data in VALID_FRAMES]
VALID_FIELD_VALUES = [value for _, _, body in VALID_ENVELOPES for value in body.values()]
field_values = st.sampled_from(VALID_FIELD_VALUES) | st.integers(min_value=-3, max_value=3) | plain_values


@st.composite
def near_valid_envelopes(draw: st.DrawFn) -> list[Any]:
    """A valid envelope with some fields dropped, replaced or added, to get past the
    envelope checks and into the field checks."""
    version, tag, body = draw(st.sampled_from(VALID_ENVELOPES))
    body = dict(body)
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(name, None)
    body.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES) | map_keys, field_values, max_size=3)))
    if draw(st.integers(min_value=0, max_value=9)) == 7:
        version = draw(st.sampled_from([0, 2, True, 1.0, "1"]))
    if draw(st.integers(min_value=0, max_value=9)) == 7:
        tag = draw(st.sampled_from(sorted(codec.tags) + ["test.nope", ""]))
    return [version, tag, body]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    assert_decodes_or_refuses(data)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        position = draw(st.integers(min_value=0, max_value=len(data)))
        if kind == "flip" and position < len(data):
            data[position] ^= draw(st.integers(min_value=1, max_value=255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[position : position + draw(st.integers(min_value=1, max_value=4))]
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated_frames())
def test_mutated_frames_decode_or_raise_decode_error(data: bytes) -> None:
    assert_decodes_or_refuses(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values)
def test_random_msgpack_values_decode_or_raise_decode_error(value: Any) -> None:
    assert_decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_envelopes())
def test_near_valid_envelopes_decode_or_raise_decode_error(envelope: list[Any]) -> None:
    assert_decodes_or_refuses(msgpack.packb(envelope, use_bin_type=True))


plain_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3), children, max_size=4),
    max_leaves=20,
)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
points = st.builds(Point, finite_floats, finite_floats)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.builds(
        make_everything,
        number=st.integers(min_value=-(2**63), max_value=2**64 - 1),
        ratio=finite_floats,
        text=st.text(),
        blob=st.binary(),
        maybe_number=st.none() | st.integers(min_value=0, max_value=2**32),
        scalar_union=st.none() | st.integers(min_value=0, max_value=10) | st.text() | st.binary(),
        numbers=st.lists(st.integers(min_value=-5, max_value=5)).map(tuple),
        points=st.lists(points, max_size=3),
        by_name=st.dictionaries(st.text(max_size=5), points, max_size=3),
        names=st.frozensets(st.text(max_size=5), max_size=3),
        mode=st.sampled_from(["fast", "slow", 3]),
        color=st.sampled_from(Color),
        anything=plain_data,
        maybe_point=st.none() | points,
    )
)
def test_generated_messages_round_trip(message: Everything) -> None:
    assert codec.decode(codec.encode(message)) == message
