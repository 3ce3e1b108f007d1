"""format_bytes: measured amounts rounded, configured bounds exact."""

from reapi_worker.host import format_bytes


def test_measured_amounts_have_one_decimal_of_the_largest_unit_they_reach():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.0 KiB"
    assert format_bytes(3 << 29) == "1.5 GiB"
    assert format_bytes(5 << 40) == "5.0 TiB"


def test_bounds_are_exact_whole_units_or_bytes():
    assert format_bytes(1 << 30, exact=True) == "1 GiB"
    assert format_bytes(3 << 29, exact=True) == "1536 MiB"
    assert format_bytes(1_000_000, exact=True) == "1000000 bytes"
    assert format_bytes(512, exact=True) == "512 bytes"
