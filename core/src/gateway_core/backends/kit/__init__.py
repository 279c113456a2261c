"""The driver kit: the toolbox every process-style driver (local, job queues, plugins) uses.

Owns nothing itself; re-exports the public helpers of its modules (`environment`, `accounts`,
`commands`, `processes`, `files`, `retries`), which docs/writing-a-backend.md lists with examples.
"""

from .accounts import RunAs, lookup_user
from .commands import scheduler_command, worker_command
from .environment import (
    CERT_FILE,
    DEFAULT_INHERITED_ENVIRONMENT,
    KEY_FILE,
    cluster_env,
    gateway_bin,
    inherited_env,
    tls_env,
    with_gateway_bin,
)
from .files import (
    TAIL_LINES,
    create_log,
    last_lines,
    open_directory,
    read_log,
    tail_log,
    write_private_file,
)
from .processes import (
    ProcessGroups,
    ProcessRef,
    ProcStat,
    StopSteps,
    all_stats,
    boot_id,
    describe_exit,
    group_members,
    launched_with_output,
    read_stat,
)
from .retries import attempts

__all__ = [
    "CERT_FILE",
    "DEFAULT_INHERITED_ENVIRONMENT",
    "KEY_FILE",
    "TAIL_LINES",
    "ProcStat",
    "ProcessGroups",
    "ProcessRef",
    "RunAs",
    "StopSteps",
    "all_stats",
    "attempts",
    "boot_id",
    "cluster_env",
    "create_log",
    "describe_exit",
    "gateway_bin",
    "group_members",
    "inherited_env",
    "last_lines",
    "launched_with_output",
    "lookup_user",
    "open_directory",
    "read_log",
    "read_stat",
    "scheduler_command",
    "tail_log",
    "tls_env",
    "with_gateway_bin",
    "worker_command",
    "write_private_file",
]
