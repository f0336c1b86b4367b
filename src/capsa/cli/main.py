"""``capsa``: run capsa (``up``), use its API like any client (capsules and their logs), and
manage the local identity service's projects, users and roles.

The client commands import only the standard library and capsa's configuration, so that they start
fast; ``up`` and the identity commands load what they need when they are asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from capsa.cli.errors import EXIT_CODES_HELP, CliError, ExitCode
from capsa.cli.output import Output
from capsa.config import Config, ConfigError, load_config
from capsa.model.identity import ROLES

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
    if args.command in ("project", "user", "role"):
        from capsa.cli import identity

        command = getattr(identity, f"{args.command}_command")
        return int(command(_config(args), out, args.action, args))

    # Loaded here so that the parser above (and --help) needs neither.
    from capsa.cli import auth, capsules, logs
    from capsa.cli.client import ApiClient

    cfg = _config(args)
    url = args.url or os.environ.get("CAPSA_URL") or cfg.api_url
    credentials = auth.find_credentials(
        os.environ, args.os_cloud, args.project, auth.clouds_files(os.environ, cfg.state_dir)
    )
    token = auth.login(credentials) if credentials else None
    client = ApiClient(url, project=args.project, token=token)
    if args.command == "logs":
        return logs.logs(
            client, out, args.capsule, args.container, args.follow, args.tail, args.timestamps
        )
    match args.action:
        case "create":
            template = capsules.with_attachment(
                capsules.read_template(args.file), args.networks, args.security_groups
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
    parser.add_argument(
        "--os-cloud",
        metavar="CLOUD",
        default=default,
        help="authenticate as this cloud of clouds.yaml (default: $OS_CLOUD, else the OS_* "
        "variables, else the cloud 'capsa' that capsa up writes)",
    )
    parser.add_argument(
        "--project", default=default, help="act in this project (the token's scope, by name)"
    )
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
        action="append",
        default=[],
        dest="networks",
        metavar="NETWORK",
        help="a network to join, by name or id; repeatable, the first one is the capsule's "
        "first interface with the default route (the capsa.io/network annotation); default: "
        "the project's default network",
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

    _identity_commands(commands, command)

    logs = command(commands, "logs", "print the logs of a capsule's container")
    logs.add_argument("capsule", help="name or uuid of the capsule")
    logs.add_argument(
        "-c", "--container", help="the container's name (default: the capsule's first container)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=_lines, metavar="N", help="only the last N lines")
    logs.add_argument("--timestamps", action="store_true", help="prefix lines with their time")
    return parser


def _identity_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    command: Callable[..., argparse.ArgumentParser],
) -> None:
    """project, user and role: they write the database directly (see capsa.cli.identity)."""
    local = " (the local identity service's database, directly)"
    project = commands.add_parser("project", help="create, list, enable or delete projects" + local)
    actions = project.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "create a project")
    create.add_argument("name")
    create.add_argument("--description", default="")
    command(actions, "list", "list the projects")
    change = command(
        actions,
        "set",
        "enable or disable a project (its tokens stop at once), allow or forbid it privileged "
        "containers",
    )
    change.add_argument(
        "name", help="name or id (with auth.mode keystone or noauth: the project's id)"
    )
    switch = change.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_true", default=None)
    switch.add_argument("--disable", dest="enabled", action="store_false")
    change.add_argument(
        "--allow-privileged",
        action=argparse.BooleanOptionalAction,
        help="let the project's capsules run privileged containers (refused by default); "
        "running ones keep running when forbidden again",
    )
    delete = command(actions, "delete", "delete a project and its role assignments")
    delete.add_argument("name", help="name or id")

    user = commands.add_parser("user", help="create, list, change or delete users" + local)
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "create a user")
    create.add_argument("name")
    create.add_argument("--role", choices=ROLES, help="its role in --project (its default project)")
    change = command(actions, "set", "change a user's password, or enable or disable it")
    change.add_argument("name", help="name or id")
    switch = change.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_true", default=None)
    switch.add_argument("--disable", dest="enabled", action="store_false")
    for sub in (create, change):
        sub.add_argument("--password", help="the password (visible to other users in ps)")
        sub.add_argument("--password-prompt", action="store_true", help="ask for the password")
    command(actions, "list", "list the users")
    delete = command(actions, "delete", "delete a user")
    delete.add_argument("name", help="name or id")

    role = commands.add_parser("role", help="give, take and list roles in projects" + local)
    actions = role.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help in (("add", "give a user a role in a project"), ("remove", "take it away")):
        sub = command(actions, name, help)
        sub.add_argument("role", choices=ROLES)
        sub.add_argument("--user", required=True, help="name or id")
    listing = command(actions, "list", "list role assignments (--project: only in that one)")
    listing.add_argument("--user", help="only this user's")


if __name__ == "__main__":
    sys.exit(main())
