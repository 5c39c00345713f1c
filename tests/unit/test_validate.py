import pytest

from fenceless.errors import InvalidName, InvalidSize
from fenceless.validate import human, lv_name, parse_size, request_id


@pytest.mark.parametrize(("text", "value"), [
    ("512M", 512 << 20), ("10G", 10 << 30), ("1.5G", 3 << 29), ("4k", 4096),
    ("2GiB", 2 << 30), ("3gb", 3 << 30), (" 7 T ", 7 << 40), ("4096B", 4096),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "why"), [
    ("", "expected a number"), ("-1G", "expected a number"), ("0G", "greater than zero"),
    ("10", "a unit is required"), ("10X", "unknown unit"), ("ten G", "expected a number"),
    ("1e3M", "expected a number"), ("9" * 5000 + "G", "more than 40 digits"),
    ("1." + "5" * 4400 + "G", "more than 40 digits"),
])
def test_bad_sizes(text, why):
    with pytest.raises(InvalidSize, match=why):
        parse_size(text)


def test_minimum():
    with pytest.raises(InvalidSize, match="at least 64M"):
        parse_size("1M", minimum=64 << 20)


@pytest.mark.parametrize("name", ["vm1-disk", "a", "web_01.img", "+x"])
def test_good_names(name):
    assert lv_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"), ("-x", "not starting with -"), ("a/b", "letters"), ("..", "not names"),
    ("x" * 128, "longer than"), ("my_tmeta", "reserves"), ("snapshot1", "reserves"),
    ("a b", "letters"), ("$(rm)", "letters"),
])
def test_bad_names(name, why):
    with pytest.raises(InvalidName, match=why):
        lv_name(name)


def test_human():
    assert human(8 << 30) == "8G"
    assert human(1536 << 20) == "1.50G"
    assert human(12) == "12B"


def test_request_ids_are_what_an_lvm_tag_and_a_record_can_hold():
    assert request_id("retry-me_1.2") == "retry-me_1.2"
    assert request_id("a" * 64) == "a" * 64
    for bad in ("", "a" * 65, "no spaces", "a/b", "x$(rm)", "é"):
        with pytest.raises(InvalidName, match="request id"):
            request_id(bad)
