from __future__ import annotations

import pytest

from capsa.cni.metrics import Registry


def test_counter_renders_help_type_and_one_line_per_label_set() -> None:
    registry = Registry()
    calls = registry.counter("calls_total", "Calls served.", ("command",))
    calls.inc(command="ADD")
    calls.inc(2, command="ADD")
    calls.inc(0, command="DEL")
    assert registry.render() == (
        "# HELP calls_total Calls served.\n"
        "# TYPE calls_total counter\n"
        'calls_total{command="ADD"} 3\n'
        'calls_total{command="DEL"} 0\n'
    )
    assert calls.value(command="ADD") == 3


def test_counter_without_labels_and_fractional_values() -> None:
    registry = Registry()
    registry.counter("seconds_total", "Time.").inc(0.25)
    assert registry.render().splitlines()[-1] == "seconds_total 0.25"


def test_gauge_goes_both_ways() -> None:
    registry = Registry()
    busy = registry.gauge("busy", "Calls in flight.", ("command",))
    busy.add(1, command="ADD")
    busy.add(1, command="ADD")
    busy.add(-1, command="ADD")
    assert "# TYPE busy gauge" in registry.render()
    assert 'busy{command="ADD"} 1' in registry.render()


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = Registry()
    latency = registry.histogram("latency_seconds", "Latency.", ("command",), buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        latency.observe(value, command="ADD")
    lines = registry.render().splitlines()
    assert lines[1] == "# TYPE latency_seconds histogram"
    assert lines[2:] == [
        'latency_seconds_bucket{command="ADD",le="0.1"} 2',
        'latency_seconds_bucket{command="ADD",le="1"} 3',
        'latency_seconds_bucket{command="ADD",le="+Inf"} 4',
        'latency_seconds_sum{command="ADD"} 3.65',
        'latency_seconds_count{command="ADD"} 4',
    ]
    assert latency.count(command="ADD") == 4


def test_label_values_and_help_are_escaped() -> None:
    registry = Registry()
    errors = registry.counter("errors_total", 'Errors\\by "code"\nsecond line.', ("msg",))
    errors.inc(msg='say "hi"\\\n')
    text = registry.render()
    assert '# HELP errors_total Errors\\\\by "code"\\nsecond line.' in text
    assert 'errors_total{msg="say \\"hi\\"\\\\\\n"} 1' in text


def test_misuse_is_refused() -> None:
    registry = Registry()
    calls = registry.counter("calls_total", "Calls.", ("command",))
    with pytest.raises(ValueError, match="takes the labels"):
        calls.inc(cmd="ADD")
    with pytest.raises(ValueError, match="cannot go down"):
        calls.inc(-1, command="ADD")
    with pytest.raises(ValueError, match="registered twice"):
        registry.counter("calls_total", "Again.")
    with pytest.raises(ValueError, match="increasing"):
        registry.histogram("h", "H.", buckets=(1.0, 0.5))
