"""``capsa``: run capsa (``up``) and use its API like any client (capsules and their logs).

The client commands import only the standard library and capsa's configuration, so that they start
fast; ``up`` loads the whole of capsa when it is asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from capsa.cli.errors import EXIT_CODES_HELP, CliError, ExitCode
from capsa.cli.output import Output
from capsa.config import Config, ConfigError, load_config

DEFAULT_WAIT_TIMEOUT = 300.0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Output(as_json=args.json)
    try:
        return _run(args, out)
    except CliError as exc:
        out.error(exc.message)
        return exc.code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (capsa ... | head): nothing more to say, and no traceback.
        sys.stderr.close()
        return ExitCode.OK


def _run(args: argparse.Namespace, out: Output) -> int:
    if args.command == "up":
        from capsa.cli.up import run_up

        return run_up(_config(args))

    # Loaded here so that the parser above (and --help) needs neither.
    from capsa.cli import capsules, logs
    from capsa.cli.client import ApiClient

    url = args.url or os.environ.get("CAPSA_URL") or _config(args).api_url
    client = ApiClient(url, project=args.project)
    if args.command == "logs":
        return logs.logs(
            client, out, args.capsule, args.container, args.follow, args.tail, args.timestamps
        )
    match args.action:
        case "create":
            template = capsules.with_attachment(
                capsules.read_template(args.file), args.network, args.security_groups
            )
            return capsules.create(client, out, template, args.wait, args.timeout)
        case "list":
            return capsules.list_all(client, out)
        case "show":
            return capsules.show(client, out, args.capsule)
        case "delete":
            return capsules.delete(client, out, args.capsule, args.wait, args.timeout)
    raise AssertionError(f"unhandled command {args.action}")


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from exc


def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options valid before or after the command; below the top they keep the top's values."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        default=default,
        help="the API's base URL (default: $CAPSA_URL, else api_url of the configuration)",
    )
    parser.add_argument("--project", default=default, help="act in this project (X-Project-Id)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print results as JSON, for scripts",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="capsa's TOML configuration (default: $CAPSA_CONFIG or /etc/capsa/capsa.toml)",
    )


def _timeout(value: str) -> float:
    seconds = float(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return seconds


def _lines(value: str) -> int:
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a count of lines (0 or more)")
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsa",
        description="Pods as a service: run capsa, and manage capsules through its API.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(sub, top=False)
        return sub

    command(commands, "up", "run capsa all-in-one on this host, in the foreground")

    capsule = commands.add_parser("capsule", help="create, list, show and delete capsules")
    actions = capsule.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "create a capsule from a template (Zun or Pod)")
    create.add_argument(
        "-f", "--file", required=True, help="the template: JSON (or YAML with PyYAML); - for stdin"
    )
    create.add_argument(
        "--network",
        help="the network to join, by name or id (the capsa.io/network annotation); "
        "default: the project's default network",
    )
    create.add_argument(
        "--security-group",
        action="append",
        default=[],
        dest="security_groups",
        metavar="GROUP",
        help="a security group to join, by name or id; repeatable (the capsa.io/security-groups "
        "annotation); default: the project's default group",
    )
    command(actions, "list", "list the project's capsules")
    show = command(actions, "show", "show a capsule and its containers")
    show.add_argument("capsule", help="name or uuid")
    delete = command(actions, "delete", "delete a capsule")
    delete.add_argument("capsule", help="name or uuid")
    for sub, until in ((create, "it runs, or fails"), (delete, "it is gone")):
        sub.add_argument("--wait", action="store_true", help=f"wait until {until}")
        sub.add_argument(
            "--timeout",
            type=_timeout,
            default=DEFAULT_WAIT_TIMEOUT,
            metavar="S",
            help=f"give up waiting after S seconds (default {DEFAULT_WAIT_TIMEOUT:g})",
        )

    logs = command(commands, "logs", "print the logs of a capsule's container")
    logs.add_argument("capsule", help="name or uuid of the capsule")
    logs.add_argument(
        "-c", "--container", help="the container's name (default: the capsule's first container)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=_lines, metavar="N", help="only the last N lines")
    logs.add_argument("--timestamps", action="store_true", help="prefix lines with their time")
    return parser


if __name__ == "__main__":
    sys.exit(main())
