"""How ``capsa`` ends: exit codes that scripts can rely on, and the error that sets one."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # The API refused the request, or the capsule waited for ended in Error.
    FAILED = 1
    # The command line or its input file is wrong.
    USAGE = 2
    # The API could not be reached.
    UNREACHABLE = 3
    # --wait gave up after --timeout seconds.
    TIMEOUT = 4
    INTERRUPTED = 130


EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    the API refused the request, or the capsule ended in Error
  2    usage: a wrong command line, configuration or input file
  3    the API could not be reached
  4    timeout: --wait gave up after --timeout seconds
  130  interrupted (Ctrl-C)
"""


class CliError(Exception):
    """Ends the command with ``code`` after printing ``message`` on stderr."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
