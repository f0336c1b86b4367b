"""Tasks that containerd 1.6 keeps behind containers its CRI plugin calls exited, freed.

When a StartContainer is cut short (capsa killed mid-call closes the call) once the shim has made
the container's task, containerd fails the call ("failed to create containerd task: failed to get
task pid: context canceled"), marks the container exited (128, StartError) and keeps the task:
its CRI plugin deletes a container's task only when it sees that task exit, and it watches only
the tasks of starts that returned. RemoveContainer of that container, and so RemovePodSandbox of
its sandbox, are then refused for ever ("cannot delete running task <id>: failed precondition").
Killing the task's processes is not enough (the task stays, stopped, and still blocks): the task
must be deleted through containerd's own task API, as its client ``ctr`` does with
``tasks delete --force`` (kill what the task still runs, wait for it, delete it).
"""

from __future__ import annotations

from capsa.runtime.errors import HostRuntimeError
from capsa.runtime.process import ProcessError, run_command

# The containerd namespace of everything its CRI plugin makes.
CRI_NAMESPACE = "k8s.io"


class StrandedTaskError(HostRuntimeError):
    """The task could not be freed; the message says why."""


async def free_stranded_task(
    containerd_address: str, container_id: str, timeout: float, ctr: str = "ctr"
) -> None:
    """Kills and deletes the task of container ``container_id``; one already gone is no error."""
    argv = [
        ctr,
        "--address",
        containerd_address.removeprefix("unix://"),
        "--namespace",
        CRI_NAMESPACE,
        "tasks",
        "delete",
        "--force",
        container_id,
    ]
    try:
        await run_command(argv, timeout)
    except ProcessError as exc:
        if "not found" in str(exc):
            return
        raise StrandedTaskError(
            f"deleting the task containerd keeps behind container {container_id}: {exc}"
        ) from exc
