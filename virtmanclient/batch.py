"""Run many virtman calls across nodes at once (for ``vmt-demo/vmtimg.py`` and ``vmtrun.py``).

Actions are grouped by the node they address: the nodes run concurrently (a thread pool, one
worker per node unless capped), the actions of one node run one after the other in file order.
One progress line is printed per action as its result comes in, then a summary.

Also the shared pieces of the demo's line-oriented config files (``image.cfg``,
``nodelist.cfg``): blank lines and ``#`` comments skipped, errors collected with their line.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from virtmanclient.client import parse_result
from virtmanclient.exceptions import ConnectionFailed, InvalidResponse, VirtmanError

DEFAULT_MAX_WORKERS = 256
OK, WARNING, FAILED, SKIPPED = "ok", "warning", "failed", "skipped"


# -- config files (pure) -----------------------------------------------------------------
class ConfigError(ValueError):
    """A config file has errors; ``errors`` holds one message per problem, in line order."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def config_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, whitespace-separated fields)`` of each line that is neither blank nor a
    ``#`` comment (CRLF line endings and a UTF-8 BOM are accepted)."""
    for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            yield number, fields


Check = Callable[[str, str], Any]  # (value, what) -> checked value, or raise ValueError


@dataclass(frozen=True)
class Form:
    """One kind of config line: its usage text (``"+ <node_ip> <vm>"``) and, for each field
    after the action sign, (key, check, what)."""

    usage: str
    fields: Sequence[tuple[str, Check, str]]


def parse_config(
    text: str, source: str, forms: Mapping[str, Form]
) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line number, action sign, {key: checked value})`` per action line.

    Raises :class:`ConfigError` with every problem (``<source> line <n>: <problem>``).
    """
    actions: list[tuple[int, str, dict[str, Any]]] = []
    errors: list[str] = []
    signs = ", ".join(repr(sign) for sign in forms)
    for number, fields in config_lines(text):
        where = f"{source} line {number}"
        form = forms.get(fields[0])
        if form is None:
            errors.append(f"{where}: unknown action {fields[0]!r}: expected one of {signs}")
            continue
        if len(fields) != len(form.fields) + 1:
            errors.append(f"{where}: expected {form.usage!r}")
            continue
        values: dict[str, Any] = {}
        line_errors = []
        for (key, check, what), value in zip(form.fields, fields[1:], strict=True):
            try:
                values[key] = check(value, what)
            except ValueError as exc:
                line_errors.append(f"{where}: {exc}")
        errors.extend(line_errors)
        if not line_errors:
            actions.append((number, fields[0], values))
    if errors:
        raise ConfigError(errors)
    return actions


# -- running -----------------------------------------------------------------------------
class Action(Protocol):
    """What the runner needs of an action: its config line and the node it addresses."""

    @property
    def line(self) -> int: ...

    @property
    def node(self) -> str: ...


A = TypeVar("A", bound=Action)


@dataclass(frozen=True)
class Report:
    """What became of one action."""

    action: Any
    description: str
    status: str  # ok | warning | failed | skipped
    info: str
    seconds: float

    @property
    def failed(self) -> bool:
        """Failed or skipped (never sent because its node was unreachable)."""
        return self.status in (FAILED, SKIPPED)


@dataclass
class Summary:
    """All reports (in config line order) and the wall-clock time of the run."""

    reports: list[Report] = field(default_factory=list)
    seconds: float = 0.0
    nodes: int = 0
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(1 for r in self.reports if r.status == status)

    @property
    def failed(self) -> int:
        """Failed plus skipped actions."""
        return sum(1 for r in self.reports if r.failed)


def classify(raw: Any) -> tuple[str, str]:
    """(status, info) of a raw answer: result strings by code, lists and dicts are listings."""
    if isinstance(raw, str):
        result = parse_result(raw)
        status = OK if result.ok else WARNING if result.warning else FAILED
        return status, result.info
    if isinstance(raw, list | tuple):
        return OK, ", ".join(str(item) for item in raw) or "(none)"
    if isinstance(raw, dict):
        return OK, ", ".join(f"{k}={v}" for k, v in sorted(raw.items())) or "(none)"
    raise InvalidResponse(f"unexpected answer {raw!r:.200}")


def format_report(report: Report, node_width: int = 0) -> str:
    """One progress line: node, config line, action, result, seconds."""
    node = str(report.action.node).ljust(node_width)
    info = f" {report.info}" if report.info else ""
    return (
        f"{node}  line {report.action.line}: {report.description}"
        f" -> {report.status.upper()}{info} ({report.seconds:.2f} s)"
    )


def format_summary(summary: Summary) -> list[str]:
    """The closing lines: counts, then every failed action again."""
    total = len(summary.reports)
    counts = ", ".join(
        f"{summary.count(s)} {s}" for s in (OK, WARNING, FAILED, SKIPPED) if summary.count(s)
    )
    head = (
        f"summary: {_plural(total, 'action')} on {_plural(summary.nodes, 'node')}"
        f" in {summary.seconds:.2f} s"
    )
    lines = [f"{head}: {counts}" if counts else head]
    if summary.interrupted:
        lines.append("interrupted: actions not started were dropped")
    failures = [r for r in summary.reports if r.failed]
    if failures:
        lines.append("failed:")
        width = max(len(str(r.action.node)) for r in failures)
        lines.extend("  " + format_report(r, width) for r in failures)
    return lines


def run_batch(
    actions: Sequence[A],
    execute: Callable[[A], Any],
    describe: Callable[[A], str],
    *,
    workers: int | None = None,
    out: TextIO | None = None,
) -> Summary:
    """Run ``execute(action)`` for every action; nodes concurrently, each node in order.

    ``workers`` caps the number of nodes served at once (default: one worker per node, at
    most 256). After a node cannot be reached its remaining actions are skipped.
    """
    stream = out if out is not None else sys.stdout
    groups: dict[str, list[A]] = {}
    for action in actions:
        groups.setdefault(str(action.node), []).append(action)
    summary = Summary(nodes=len(groups))
    if not groups:
        return summary
    width = max(len(node) for node in groups)
    lock = threading.Lock()

    def record(report: Report) -> None:
        with lock:
            summary.reports.append(report)
            print(format_report(report, width), file=stream, flush=True)

    def run_node(node_actions: list[A]) -> None:
        unreachable: str | None = None
        for action in node_actions:
            description = describe(action)
            if unreachable:
                record(Report(action, description, SKIPPED, unreachable, 0.0))
                continue
            started = time.monotonic()
            try:
                status, info = classify(execute(action))
            except ConnectionFailed as exc:
                status, info = FAILED, str(exc)
                unreachable = f"{action.node} unreachable (line {action.line})"
            except VirtmanError as exc:
                status, info = FAILED, str(exc)
            except Exception as exc:  # one bad action must not stop the others
                status, info = FAILED, f"{type(exc).__name__}: {exc}"
            record(Report(action, description, status, info, time.monotonic() - started))

    count = max(1, min(len(groups), workers or DEFAULT_MAX_WORKERS))
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="vmt-node")
    try:
        futures = [pool.submit(run_node, group) for group in groups.values()]
        wait(futures)
        for future in futures:
            future.result()  # run_node catches everything; re-raise a bug in it, if any
    except KeyboardInterrupt:
        summary.interrupted = True
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        pool.shutdown()
    summary.seconds = time.monotonic() - started
    with lock:
        summary.reports.sort(key=lambda r: r.action.line)
    return summary


# -- the demo scripts' command line ------------------------------------------------------
def add_options(
    parser: argparse.ArgumentParser,
    default_file: str,
    default_port: int,
    default_timeout: float,
    env_name: str = "VMT_TOKEN",
) -> None:
    """``--file``, ``--workers``, ``--token``, ``--ca-file``, ``--port``, ``--timeout``."""
    parser.add_argument(
        "--file",
        default=default_file,
        help=f"The file to run (default: {default_file} in the current directory).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"Nodes served at once (default: one per node, at most {DEFAULT_MAX_WORKERS}).",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(env_name) or None,
        help=f"Token sent as X-Auth-Token (env {env_name}).",
    )
    parser.add_argument(
        "--ca-file",
        default=os.environ.get("VMT_CACERT") or None,
        help="PEM CA certificate of the nodes' https XML-RPC (tls_cert_file): calls use "
        "https and verify against it (env VMT_CACERT; default: plain http).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=default_port,
        help=f"XML-RPC port of virtman on every node (default {default_port}).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default_timeout,
        help=f"Seconds to wait for each answer (default {default_timeout:g}).",
    )


def run_file(
    prog: str,
    args: argparse.Namespace,
    parse: Callable[[str, str], Sequence[A]],
    execute: Callable[[A], Any],
    describe: Callable[[A], str],
    out: TextIO | None = None,
) -> int:
    """Read and check ``args.file``, run it, print progress and a summary.

    Returns the exit status: 0 no action failed, 1 some did, 2 bad file or option (then
    nothing was sent), 130 interrupted.
    """
    stream = out if out is not None else sys.stdout

    def error(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2

    if args.workers is not None and args.workers < 1:
        return error("--workers must be at least 1")
    if not 1 <= args.port <= 65535:
        return error(f"--port {args.port}: must be a port number 1-65535")
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return error(f"cannot read {args.file}: {exc}")
    try:
        actions = parse(text, os.path.basename(args.file))
    except ConfigError as exc:
        for message in exc.errors:
            print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"{prog}: nothing was sent", file=sys.stderr)
        return 2
    if not actions:
        print(f"{prog}: {args.file}: nothing to do", file=stream)
        return 0
    nodes = len({a.node for a in actions})
    workers = min(nodes, args.workers or DEFAULT_MAX_WORKERS)
    print(
        f"{prog}: {_plural(len(actions), 'action')} from {args.file} on "
        f"{_plural(nodes, 'node')} ({_plural(workers, 'worker')})",
        file=stream,
        flush=True,
    )
    summary = run_batch(actions, execute, describe, workers=args.workers, out=stream)
    for line in format_summary(summary):
        print(line, file=stream)
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
