"""The cni case's report of the daemon's time: what it spent between two metrics pages, and the
line under the table with its steps."""

from __future__ import annotations

from bench.cases.cni import daemon_time_line, parse_daemon_time

_BEFORE = """\
capsa_cni_request_duration_seconds_sum{command="ADD"} 0.004
capsa_cni_request_duration_seconds_count{command="ADD"} 2
capsa_cni_step_duration_seconds_sum{command="ADD",step="plug"} 0.002
capsa_cni_step_duration_seconds_count{command="ADD",step="plug"} 2
capsa_cni_step_duration_seconds_sum{command="ADD",step="wait"} 0.01
capsa_cni_step_duration_seconds_count{command="ADD",step="wait"} 1
"""
_AFTER = """\
capsa_cni_request_duration_seconds_bucket{command="ADD",le="0.005"} 12
capsa_cni_request_duration_seconds_sum{command="ADD"} 0.024
capsa_cni_request_duration_seconds_count{command="ADD"} 12
capsa_cni_request_duration_seconds_sum{command="DEL"} 0.008
capsa_cni_request_duration_seconds_count{command="DEL"} 10
capsa_cni_step_duration_seconds_sum{command="ADD",step="plug"} 0.012
capsa_cni_step_duration_seconds_count{command="ADD",step="plug"} 12
capsa_cni_step_duration_seconds_sum{command="ADD",step="wait"} 0.01
capsa_cni_step_duration_seconds_count{command="ADD",step="wait"} 1
"""


def test_what_the_daemon_spent_between_two_metrics_pages() -> None:
    spent = parse_daemon_time(_AFTER).since(parse_daemon_time(_BEFORE))

    assert spent.calls.keys() == {("ADD",), ("DEL",)}
    seconds, calls = spent.calls[("ADD",)]
    assert (round(seconds, 6), calls) == (0.02, 10)
    assert spent.calls[("DEL",)] == (0.008, 10)
    # The wait that came before is not the case's: only the series that grew count.
    assert spent.steps.keys() == {("ADD", "plug")}
    assert round(spent.steps[("ADD", "plug")][0], 6) == 0.01


def test_the_line_gives_each_commands_time_and_steps_and_how_many_calls_waited() -> None:
    details = {
        "daemon_mean_ms": {"ADD": 2.1, "DEL": 0.8},
        "daemon_calls": {"ADD": 55, "DEL": 55},
        "daemon_steps_mean_ms": {
            "ADD": {"lookup": 0.25, "plug": 1.3, "record": 0.2, "wait": 0.4},
            "DEL": {"detach": 0.3, "unbind": 0.35},
        },
        # Three ADDs waited for the firewall, and looked their ports up again after it.
        "daemon_steps_taken": {
            "ADD": {"lookup": 58, "plug": 55, "record": 55, "wait": 3},
            "DEL": {"detach": 55, "unbind": 55},
        },
    }

    line = daemon_time_line(details)

    assert line is not None
    assert line.endswith(
        "ADD 2.10 ms (lookup 0.25, plug 1.30, wait 0.40 in 3 calls; after the answer: record "
        "0.20), DEL 0.80 ms (detach 0.30, unbind 0.35)"
    )


def test_a_step_one_call_took_says_so() -> None:
    details = {
        "daemon_mean_ms": {"ADD": 2.0},
        "daemon_calls": {"ADD": 50},
        "daemon_steps_mean_ms": {"ADD": {"lookup": 0.25, "wait": 0.03}},
        "daemon_steps_taken": {"ADD": {"lookup": 51, "wait": 1}},
    }
    line = daemon_time_line(details)
    assert line is not None and line.endswith("ADD 2.00 ms (lookup 0.25, wait 0.03 in 1 call)")


def test_no_line_without_the_daemons_time() -> None:
    assert daemon_time_line({}) is None
    assert daemon_time_line({"daemon_mean_ms": {}}) is None
