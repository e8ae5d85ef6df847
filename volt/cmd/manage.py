"""``volt-manage``: the admin's offline tools (run on the master, next to volt.conf).

``volt-manage node-token <host> [--config-file /etc/volt/volt.conf]`` prints the node token
of ``host`` (the value of that node's ``master_token`` in virtman.conf), derived from
``[auth] node_secret``. Nothing is stored: volt-api recomputes it to check it.
"""

from __future__ import annotations

import argparse
import sys

from oslo_config import cfg

from volt import auth, conf
from volt.errors import InvalidInput


def _node_secret(config_files: list[str]) -> str:
    config = cfg.ConfigOpts()
    conf.register_opts(config)
    config([], project="volt", prog="volt-api", default_config_files=config_files or None)
    secret = config.auth.node_secret
    if not secret:
        raise SystemExit("volt-manage: [auth] node_secret is not set in the configuration")
    return str(secret)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="volt-manage", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        help="volt.conf to read [auth] node_secret from (default: volt's usual places)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("node-token", help="print the node token of a host")
    token.add_argument("host", help="the node's host_ip (IP address or DNS name)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    secret = _node_secret(args.config_file)
    try:
        print(auth.node_token(secret, args.host))
    except InvalidInput as err:
        raise SystemExit(f"volt-manage: {err.detail}") from None


if __name__ == "__main__":
    main()
