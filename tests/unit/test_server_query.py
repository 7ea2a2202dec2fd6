"""Losant-style query parsing (agent/server/api/query.py), without a server.

Tables for each parser; the exact query ``losant_rest`` puts on the wire, captured
from the client's own request path with the network call replaced; and property
tests: any text gives a value or a one-line QueryError (never another exception),
and a glob turned into ``LIKE … ESCAPE …`` matches in SQLite exactly what
``fnmatch`` matches for the same glob with only ``*`` special.
"""

from __future__ import annotations

import fnmatch
import sqlite3
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.server.api.query import (
    LIKE_ESCAPE,
    MAX_PAGE,
    MAX_TAG_FILTERS,
    Paging,
    QueryError,
    Sort,
    TagFilter,
    glob_to_like,
    known_params,
    parse_bool,
    parse_bool_param,
    parse_int,
    parse_paging,
    parse_sort,
    parse_tag_filter,
    single_value,
)

Pairs = list[tuple[str, str]]

CLIENT = "_actions=false&_links=true&_embedded=true"
DEVICE_SORT = ("name", "id", "creationDate", "lastUpdated")


def q(query: str) -> Pairs:
    """A query string as Starlette's ``multi_items()`` gives it (blank values kept)."""
    return parse_qsl(query, keep_blank_values=True)


def one_line(error: QueryError) -> str:
    message = str(error)
    assert message
    assert len(message.splitlines()) == 1, message
    return message


# ------------------------------------------------------------------ parse_bool
@pytest.mark.parametrize("value", ["true", "True", "TRUE", "tRuE", "1", "yes", "Yes", "YES"])
def test_parse_bool_true(value: str) -> None:
    assert parse_bool("filterEmpty", value) is True


@pytest.mark.parametrize("value", ["false", "False", "FALSE", "0", "no", "No", "NO", ""])
def test_parse_bool_false(value: str) -> None:
    assert parse_bool("filterEmpty", value) is False


@pytest.mark.parametrize(
    "value",
    ["2", "tru", "t", "y", "n", "on", "off", "none", "null", " true", "true ", "true\n",
     "00", "01", "yess", "\uff54rue", "ye\u017f", "True\x00"],
)  # fmt: skip
def test_parse_bool_rejects(value: str) -> None:
    with pytest.raises(QueryError, match=r"^filterEmpty: expected true or false") as e:
        parse_bool("filterEmpty", value)
    assert e.value.param == "filterEmpty"
    one_line(e.value)


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", False), ("excludeConnectionInfo=True", True), ("excludeConnectionInfo=", False),
     ("other=1", False)],
)  # fmt: skip
def test_parse_bool_param(query: str, expected: bool) -> None:
    assert parse_bool_param(q(query), "excludeConnectionInfo", default=False) is expected
    if query in ("", "other=1"):
        assert parse_bool_param(q(query), "excludeConnectionInfo", default=True) is True


def test_parse_bool_param_twice() -> None:
    with pytest.raises(QueryError, match=r"^filterEmpty: given more than once$"):
        parse_bool_param(q("filterEmpty=1&filterEmpty=1"), "filterEmpty", default=False)


# ------------------------------------------------------------------ parse_int
@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("7", 7), ("007", 7), ("10000", 10000), ("0" * 20, 0)],
)
def test_parse_int_accepts(value: str, expected: int) -> None:
    assert parse_int("perPage", value, minimum=0, maximum=10000) == expected


@pytest.mark.parametrize(
    "value",
    ["", "-1", "+1", " 1", "1 ", "1\n", "1.0", "1e3", "0x10", "1_000", "1,000",
     "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
     "\u00b2",  # SUPERSCRIPT TWO: likewise
     "\uff11",  # FULLWIDTH DIGIT ONE: int() would accept it
     "10001", "0" * 21, "9" * 5000, "abc"],
)  # fmt: skip
def test_parse_int_rejects(value: str) -> None:
    with pytest.raises(QueryError, match=r"^perPage: expected an integer from 0 to 10000") as e:
        parse_int("perPage", value, minimum=0, maximum=10000)
    assert len(one_line(e.value)) < 200


def test_parse_int_minimum() -> None:
    with pytest.raises(QueryError, match="from 1 to 5, got '0'"):
        parse_int("perPage", "0", minimum=1, maximum=5)


# ------------------------------------------------------------------ single_value
def test_single_value() -> None:
    assert single_value(q("a=1&b=2"), "a") == "1"
    assert single_value(q("a=&b=2"), "a") == ""
    assert single_value(q("b=2"), "a") is None
    with pytest.raises(QueryError, match=r"^a: given more than once$"):
        single_value(q("a=1&b=2&a=1"), "a")


# ------------------------------------------------------------------ parse_paging
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", Paging(0, 1000)),
        (CLIENT, Paging(0, 1000)),
        ("page=0&perPage=10", Paging(0, 10)),
        ("page=3", Paging(3, 1000)),
        ("perPage=1", Paging(0, 1)),
        ("perPage=10000", Paging(0, 10000)),
        (f"page={MAX_PAGE}&perPage=5", Paging(MAX_PAGE, 5)),
        ("page=02&unrelated=x", Paging(2, 1000)),
    ],
)
def test_parse_paging(query: str, expected: Paging) -> None:
    assert parse_paging(q(query)) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("perPage=0", r"^perPage: expected an integer from 1 to 10000, got '0'$"),
        ("perPage=10001", r"^perPage: expected an integer from 1 to 10000"),
        ("perPage=", r"^perPage: expected an integer"),
        ("page=-1", r"^page: expected an integer from 0 to 1000000, got '-1'$"),
        (f"page={MAX_PAGE + 1}", r"^page: expected an integer from 0 to 1000000"),
        ("page=one", r"^page: expected an integer"),
        ("page=1&page=2", r"^page: given more than once$"),
        ("perPage=1&perPage=1", r"^perPage: given more than once$"),
    ],
)
def test_parse_paging_rejects(query: str, message: str) -> None:
    with pytest.raises(QueryError, match=message) as e:
        parse_paging(q(query))
    one_line(e.value)


def test_parse_paging_limits() -> None:
    assert parse_paging(q(""), default_per_page=50, max_per_page=100) == Paging(0, 50)
    assert parse_paging(q("perPage=100"), default_per_page=50, max_per_page=100).per_page == 100
    with pytest.raises(QueryError, match="from 1 to 100,"):
        parse_paging(q("perPage=101"), default_per_page=50, max_per_page=100)
    assert Paging(3, 25).offset == 75
    with pytest.raises(ValueError, match="default_per_page") as e:
        parse_paging(q(""), default_per_page=0)
    assert not isinstance(e.value, QueryError)  # a programming error, not a 400


# ------------------------------------------------------------------ parse_sort
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", Sort("name", descending=False)),
        (CLIENT, Sort("name", descending=False)),
        ("sortField=id", Sort("id", descending=False)),
        ("sortDirection=desc", Sort("name", descending=True)),
        ("sortDirection=DESC&sortField=lastUpdated", Sort("lastUpdated", descending=True)),
        ("sortDirection=Asc", Sort("name", descending=False)),
        ("sortField=creationDate&sortDirection=asc", Sort("creationDate", descending=False)),
    ],
)
def test_parse_sort(query: str, expected: Sort) -> None:
    sort = parse_sort(q(query), allowed=DEVICE_SORT, default_field="name", default_direction="asc")
    assert sort == expected
    assert sort.direction == ("desc" if expected.descending else "asc")


def test_parse_sort_default_direction() -> None:
    sort = parse_sort(q(""), allowed=DEVICE_SORT, default_field="id", default_direction="desc")
    assert sort == Sort("id", descending=True)
    assert sort.direction == "desc"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sortField=Name", r"^sortField: got 'Name'; accepted values are: "
                           r"name, id, creationDate, lastUpdated$"),
        ("sortField=", r"^sortField: got ''; accepted values are: name, id,"),
        ("sortField=password", r"^sortField: got 'password'; accepted values"),
        ("sortDirection=up", r"^sortDirection: expected asc or desc, got 'up'$"),
        ("sortDirection=", r"^sortDirection: expected asc or desc, got ''$"),
        ("sortDirection=descending", r"^sortDirection: expected asc or desc"),
        ("sortField=id&sortField=id", r"^sortField: given more than once$"),
        ("sortDirection=asc&sortDirection=desc", r"^sortDirection: given more than once$"),
    ],
)  # fmt: skip
def test_parse_sort_rejects(query: str, message: str) -> None:
    with pytest.raises(QueryError, match=message) as e:
        parse_sort(q(query), allowed=DEVICE_SORT, default_field="name", default_direction="asc")
    one_line(e.value)


def test_parse_sort_bad_defaults_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="default sort field") as e:
        parse_sort(q(""), allowed=DEVICE_SORT, default_field="nope", default_direction="asc")
    assert not isinstance(e.value, QueryError)
    bad: Any = "sideways"
    with pytest.raises(ValueError, match="default sort direction"):
        parse_sort(q(""), allowed=DEVICE_SORT, default_field="id", default_direction=bad)


# ------------------------------------------------------------------ parse_tag_filter
LOSANT_EXAMPLE = "tagFilter[0][key]=Floor&tagFilter[0][value]=2&tagFilter[1][key]=Serial"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", []),
        (CLIENT + "&sortField=name", []),
        (LOSANT_EXAMPLE, [TagFilter("Floor", "2"), TagFilter("Serial", None)]),
        ("tagFilter[0][value]=red", [TagFilter(None, "red")]),
        # The value before the key, and N out of order with gaps: ordered by N.
        ("tagFilter[10][key]=b&tagFilter[2][value]=x%20y&tagFilter[2][key]=a",
         [TagFilter("a", "x y"), TagFilter("b", None)]),
        ("tagFilter[007][key]=z", [TagFilter("z", None)]),
        ("tagFilter[999999][key]=k_-9", [TagFilter("k_-9", None)]),
        # Values are free text (Losant: 1 to 255 characters).
        ("tagFilter[0][value]=%2A%25_%5C%20%E2%9C%93", [TagFilter(None, "*%_\\ \u2713")]),
        ("tagFilter[0][key]=" + "k" * 255 + "&tagFilter[0][value]=" + "v" * 255,
         [TagFilter("k" * 255, "v" * 255)]),
        # Not ours: left to known_params.
        ("tagFilterX=1&tagfilter[0][key]=a", []),
    ],
)  # fmt: skip
def test_parse_tag_filter(query: str, expected: list[TagFilter]) -> None:
    assert parse_tag_filter(q(query)) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        # The JSON form: neither losant_rest nor Losant's docs send it.
        ('tagFilter=[{"key":"Floor","value":"2"}]', r"^tagFilter: expected tagFilter\[N\]\[key\]"),
        ("tagFilter[0]=Floor", r"^tagFilter\[0\]: expected tagFilter\[N\]\[key\]"),
        ("tagFilter[0][Key]=Floor", r"^tagFilter\[0\]\[Key\]: expected"),
        ("tagFilter[0][key][x]=Floor", r"^tagFilter\[0\]\[key\]\[x\]: expected"),
        ("tagFilter[][key]=Floor", r"^tagFilter\[\]\[key\]: expected"),
        ("tagFilter[-1][key]=Floor", r"^tagFilter\[-1\]\[key\]: expected"),
        ("tagFilter[a][key]=Floor", r"^tagFilter\[a\]\[key\]: expected"),
        ("tagFilter[1000000][key]=Floor", r"^tagFilter\[1000000\]\[key\]: expected"),
        ("tagFilter[%D9%A3][key]=Floor", r"^tagFilter\[\u0663\]\[key\]: expected"),
        # Neither key nor value: both given empty.
        ("tagFilter[0][key]=&tagFilter[0][value]=", r"^tagFilter\[0\]\[key\]: expected 1 to 255"),
        ("tagFilter[0][value]=", r"^tagFilter\[0\]\[value\]: is empty"),
        ("tagFilter[0][key]=Floor&tagFilter[0][value]=", r"^tagFilter\[0\]\[value\]: is empty"),
        ("tagFilter[0][key]=my%20key", r"^tagFilter\[0\]\[key\]: expected 1 to 255 of the"),
        ("tagFilter[0][key]=" + "k" * 256, r"^tagFilter\[0\]\[key\]: expected 1 to 255"),
        ("tagFilter[0][value]=" + "v" * 256, r"^tagFilter\[0\]\[value\]: longer than 255"),
        ("tagFilter[0][value]=a%00b", r"^tagFilter\[0\]\[value\]: contains a NUL"),
        ("tagFilter[0][key]=a&tagFilter[0][key]=a", r"^tagFilter\[0\]\[key\]: given more than"),
        ("tagFilter[0][key]=a&tagFilter[00][key]=b", r"^tagFilter\[0\]\[key\]: given more than"),
    ],
)  # fmt: skip
def test_parse_tag_filter_rejects(query: str, message: str) -> None:
    with pytest.raises(QueryError, match=message) as e:
        parse_tag_filter(q(query))
    one_line(e.value)


def test_parse_tag_filter_bounds_the_count() -> None:
    most = [(f"tagFilter[{i * 7}][key]", f"k{i}") for i in range(MAX_TAG_FILTERS)]
    filters = parse_tag_filter(most)
    assert [f.key for f in filters] == [f"k{i}" for i in range(MAX_TAG_FILTERS)]
    more = [*most, ("tagFilter[5][value]", "v")]
    with pytest.raises(QueryError, match=r"^tagFilter: more than 100 tag filters$"):
        parse_tag_filter(more)
    # Another part of an existing filter is not another filter.
    assert len(parse_tag_filter([*most, ("tagFilter[7][value]", "v")])) == MAX_TAG_FILTERS


def test_parse_tag_filter_quotes_hostile_names_on_one_line() -> None:
    with pytest.raises(QueryError) as e:
        parse_tag_filter([("tagFilter[\n]" + "x" * 100, "v")])
    assert e.value.param.startswith("'tagFilter[\\n]xxx")
    one_line(e.value)


# ------------------------------------------------------------------ what losant_rest sends
WIRE = (
    "_actions=false&_links=true&_embedded=true"
    "&tagFilter%5B0%5D%5Bkey%5D=Floor&tagFilter%5B0%5D%5Bvalue%5D=2"
    "&tagFilter%5B1%5D%5Bkey%5D=Serial"
)


class _Sent:
    status_code = 200
    text = '{"items": []}'

    def json(self) -> Any:
        return {"items": []}


def test_losant_rest_tag_filter_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's own request path (``Client.request`` → ``flatten_params`` →
    ``requests``) with only the network call replaced, then parsed as a server would."""
    losant_client = pytest.importorskip("losant_rest.client")
    import requests

    urls: list[str] = []

    def capture(method: str, url: str, **kwargs: Any) -> _Sent:
        prepared = requests.Request(method, url, **kwargs).prepare()
        assert prepared.url is not None
        urls.append(prepared.url)
        return _Sent()

    monkeypatch.setattr(losant_client.requests, "request", capture)
    client = losant_client.Client(auth_token="t", url="http://127.0.0.1:9")
    client.devices.get(
        applicationId="app1",
        tagFilter=[{"key": "Floor", "value": "2"}, {"key": "Serial"}],
    )
    client.devices.get(applicationId="app1", excludeConnectionInfo=True, perPage=10)

    tags, flags = (urlsplit(url) for url in urls)
    assert tags.path == "/applications/app1/devices"
    assert tags.query == WIRE
    pairs = q(tags.query)
    assert parse_tag_filter(pairs) == [TagFilter("Floor", "2"), TagFilter("Serial", None)]
    known_params(pairs, {"tagFilter"})
    # Python's True arrives as the string "True"; numbers as decimal text.
    assert flags.query == CLIENT + "&perPage=10&excludeConnectionInfo=True"
    pairs = q(flags.query)
    assert parse_bool_param(pairs, "excludeConnectionInfo", default=False) is True
    assert parse_paging(pairs) == Paging(0, 10)
    known_params(pairs, {"perPage", "excludeConnectionInfo"})


def test_starlette_gives_the_same_pairs() -> None:
    datastructures = pytest.importorskip("starlette.datastructures")
    pairs = datastructures.QueryParams(WIRE + "&filter=&page=1&page=2").multi_items()
    assert pairs == q(WIRE + "&filter=&page=1&page=2")
    assert parse_tag_filter(pairs) == [TagFilter("Floor", "2"), TagFilter("Serial", None)]


# ------------------------------------------------------------------ known_params
@pytest.mark.parametrize(
    ("query", "allowed"),
    [
        ("", set()),
        (CLIENT, set()),
        (CLIENT + "&page=0&perPage=5", {"page", "perPage"}),
        (LOSANT_EXAMPLE + "&filter=a*", {"tagFilter", "filter"}),
        ("tagFilter[x]=malformed", {"tagFilter"}),  # its shape is parse_tag_filter's to check
        ("_actions=anything&_links=&_embedded=no", frozenset({"page"})),
    ],
)
def test_known_params_accepts(query: str, allowed: set[str]) -> None:
    known_params(q(query), allowed)


@pytest.mark.parametrize(
    ("query", "allowed", "message"),
    [
        ("pge=1", {"page", "perPage"}, r"^pge: unknown query parameter; accepted parameters "
                                       r"are: page, perPage$"),
        (LOSANT_EXAMPLE, {"page"}, r"^tagFilter\[0\]\[key\]: unknown query parameter"),
        ("tagFilter=[]", {"page"}, r"^tagFilter: unknown"),
        ("tagFilterX=1", {"tagFilter"}, r"^tagFilterX: unknown"),
        ("_Actions=false", {"page"}, r"^_Actions: unknown"),
        ("x=1", set(), r"^x: unknown query parameter; accepted parameters are: none$"),
        ("a%0Ab=1", {"page"}, r"^'a\\nb': unknown"),
    ],
)  # fmt: skip
def test_known_params_rejects(query: str, allowed: set[str], message: str) -> None:
    with pytest.raises(QueryError, match=message) as e:
        known_params(q(query), allowed)
    one_line(e.value)


# ------------------------------------------------------------------ glob_to_like
@pytest.mark.parametrize(
    ("glob", "like"),
    [
        ("", ""),
        ("*", "%"),
        ("***", "%"),
        ("my * device", "my % device"),
        ("gw-*-a*", "gw-%-a%"),
        ("100%", "100\\%"),
        ("a_b", "a\\_b"),
        ("back\\slash", "back\\\\slash"),
        ("*\\*", "%\\\\%"),
        ("what?", "what?"),  # ? is not a wildcard: Losant documents only *
        ("[ab]", "[ab]"),
        ("\u2713*", "\u2713%"),
    ],
)
def test_glob_to_like(glob: str, like: str) -> None:
    assert glob_to_like(glob) == (like, LIKE_ESCAPE)


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("x" * 256, r"^filter: longer than 255 characters$"),
        ("a\x00*", r"^filter: contains a NUL character$"),
        ("a\ud800", r"^filter: is not valid Unicode text$"),
    ],
)
def test_glob_to_like_rejects(glob: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        glob_to_like(glob)


def test_glob_to_like_bounds() -> None:
    assert glob_to_like("x" * 255)[0] == "x" * 255
    assert glob_to_like("_" * 255)[0] == "\\_" * 255  # the bound is on the glob, not the result
    assert glob_to_like("abc", max_length=3) == ("abc", LIKE_ESCAPE)
    with pytest.raises(QueryError, match=r"^version: longer than 3 characters$"):
        glob_to_like("abcd", name="version", max_length=3)


def fnmatch_star_only(text: str, glob: str) -> bool:
    """The reference: ``fnmatch`` with ``?`` and ``[`` made literal, so only ``*`` is special."""
    return fnmatch.fnmatchcase(text, glob.replace("[", "[[]").replace("?", "[?]"))


@pytest.fixture(scope="module")
def like_db() -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA case_sensitive_like=ON")
    try:
        yield db
    finally:
        db.close()


def sqlite_like(db: sqlite3.Connection, text: str, glob: str) -> bool:
    like, escape = glob_to_like(glob)
    (row,) = db.execute("SELECT ? LIKE ? ESCAPE ?", (text, like, escape)).fetchall()
    return bool(row[0])


@pytest.mark.parametrize(
    ("glob", "text", "expected"),
    [
        ("my * device", "my big device", True),
        ("my * device", "my  device", True),
        ("my * device", "my device", False),
        ("100%", "100%", True),
        ("100%", "1000", False),
        ("a_c", "abc", False),
        ("a_c", "a_c", True),
        ("a\\*", "a\\xyz", True),
        ("a\\*", "ab", False),
        ("a?", "ab", False),
        ("a?", "a?", True),
        ("Gw*", "gw-1", False),  # case-sensitive LIKE: the glob itself does not fold case
        ("*", "", True),
        ("", "", True),
        ("", "a", False),
    ],
)
def test_glob_to_like_in_sqlite(
    like_db: sqlite3.Connection, glob: str, text: str, expected: bool
) -> None:
    assert fnmatch_star_only(text, glob) is expected
    assert sqlite_like(like_db, text, glob) is expected


def test_glob_to_like_through_sqlalchemy() -> None:
    """How a route uses it: ``column.like(pattern, escape=esc)``."""
    sa = pytest.importorskip("sqlalchemy")
    names = ["my device", "my big device", "100%", "1000", "a_c", "abc", "a\\b", "ab", "a?"]
    globs = ["my * device", "100%", "a_c", "a\\*", "a?", "*", "1*"]
    engine = sa.create_engine("sqlite://")
    try:
        table = sa.Table("t", sa.MetaData(), sa.Column("name", sa.String))
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA case_sensitive_like=ON")
            table.create(conn)
            conn.execute(table.insert(), [{"name": n} for n in names])
            for glob in globs:
                like, escape = glob_to_like(glob)
                query = sa.select(table.c.name).where(table.c.name.like(like, escape=escape))
                found = {row[0] for row in conn.execute(query)}
                assert found == {n for n in names if fnmatch_star_only(n, glob)}, glob
    finally:
        engine.dispose()


SMALL = "aA%_\\*?[]"


@settings(max_examples=400, deadline=None)
@given(glob=st.text(SMALL, max_size=8), text=st.text(SMALL, max_size=8))
def test_glob_to_like_matches_fnmatch_small_alphabet(
    like_db: sqlite3.Connection, glob: str, text: str
) -> None:
    assert sqlite_like(like_db, text, glob) is fnmatch_star_only(text, glob)


STORABLE = st.characters(codec="utf-8", exclude_characters="\x00")  # no surrogates, no NUL


@settings(deadline=None)
@given(glob=st.text(STORABLE, max_size=12), data=st.data())
def test_glob_to_like_matches_fnmatch_any_text(
    like_db: sqlite3.Connection, glob: str, data: st.DataObject
) -> None:
    # Half the time a string built from the glob (each * filled in), so that
    # matches are common, not just the rare random hit.
    if data.draw(st.booleans()):
        parts = glob.split("*")
        fills = [data.draw(st.text(STORABLE, max_size=3)) for _ in parts[1:]]
        text = parts[0] + "".join(f + p for f, p in zip(fills, parts[1:], strict=True))
    else:
        text = data.draw(st.text(STORABLE, max_size=12))
    assert sqlite_like(like_db, text, glob) is fnmatch_star_only(text, glob)


# ------------------------------------------------------------------ never another exception
NAMES = ["page", "perPage", "sortField", "sortDirection", "filter", "tagFilter", "_actions"]
KEYS = st.one_of(
    st.sampled_from(NAMES),
    st.text(max_size=20),
    st.builds(
        "tagFilter[{}][{}]".format,
        st.one_of(st.integers(-2, 10**7), st.text(max_size=4)),
        st.one_of(st.sampled_from(["key", "value"]), st.text(max_size=6)),
    ),
)
VALUES = st.one_of(st.text(max_size=300), st.sampled_from(["", "0", "1", "True", "desc", "id"]))
PAIRS = st.lists(st.tuples(KEYS, VALUES), max_size=12)


def value_or_query_error(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except QueryError as e:
        one_line(e)
        return e


@given(value=st.text())
def test_scalars_never_raise_anything_else(value: str) -> None:
    result = value_or_query_error(parse_bool, "b", value)
    assert isinstance(result, bool | QueryError)
    result = value_or_query_error(parse_int, "n", value, minimum=0, maximum=10**6)
    assert isinstance(result, QueryError) or 0 <= result <= 10**6
    result = value_or_query_error(glob_to_like, value)
    assert isinstance(result, tuple | QueryError)


@given(pairs=PAIRS)
def test_pair_parsers_never_raise_anything_else(pairs: Pairs) -> None:
    paging = value_or_query_error(parse_paging, pairs)
    assert isinstance(paging, QueryError) or (
        0 <= paging.page <= MAX_PAGE and 1 <= paging.per_page <= 10000
    )
    sort = value_or_query_error(
        parse_sort, pairs, allowed=DEVICE_SORT, default_field="name", default_direction="asc"
    )
    assert isinstance(sort, QueryError) or sort.field in DEVICE_SORT
    tags = value_or_query_error(parse_tag_filter, pairs)
    if not isinstance(tags, QueryError):
        assert len(tags) <= MAX_TAG_FILTERS
        assert all(t.key is not None or t.value is not None for t in tags)
    value_or_query_error(known_params, pairs, {"page", "tagFilter"})
    value_or_query_error(parse_bool_param, pairs, "_actions", default=False)
