from __future__ import annotations

import pytest

from capsa.model.capsule import CapsuleSpec, ContainerSpec, RestartPolicy


def _spec(cpu: int, memory: int, name: str = "c") -> ContainerSpec:
    return ContainerSpec(name=name, image="busybox", cpu_millis=cpu, memory_mb=memory)


def test_a_capsule_needs_the_sum_of_its_containers_or_its_largest_init_container() -> None:
    small_inits = CapsuleSpec(
        name="a", containers=(_spec(100, 64), _spec(200, 32)), init_containers=(_spec(250, 90),)
    )
    assert (small_inits.cpu_millis, small_inits.memory_mb) == (300, 96)
    big_init = CapsuleSpec(
        name="b", containers=(_spec(100, 64),), init_containers=(_spec(900, 512),)
    )
    assert (big_init.cpu_millis, big_init.memory_mb) == (900, 512)


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts"),
    [
        (RestartPolicy.ALWAYS, 0, True),
        (RestartPolicy.ALWAYS, 1, True),
        (RestartPolicy.ON_FAILURE, 0, False),
        (RestartPolicy.ON_FAILURE, 137, True),
        (RestartPolicy.NEVER, 1, False),
    ],
)
def test_restart_policies(policy: RestartPolicy, exit_code: int, restarts: bool) -> None:
    assert policy.restarts(exit_code) is restarts
