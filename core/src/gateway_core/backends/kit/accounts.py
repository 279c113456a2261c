"""The local account a cluster's processes run as.

Owns `RunAs` (uid, gid, groups, home, shell, and the identity variables written from them) and
`lookup_user`, the one place a user name becomes an account, with clear refusals.
"""

from __future__ import annotations

import os
import pwd

from attrs import define


@define(kw_only=True, frozen=True)
class RunAs:
    """The account a cluster's processes run as (the ``local`` backend, the job-queue
    drivers)."""

    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str
    shell: str

    @classmethod
    def from_pwd(cls, entry: pwd.struct_passwd) -> RunAs:
        return cls(
            name=entry.pw_name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
            home=entry.pw_dir,
            shell=entry.pw_shell or "/bin/sh",
        )

    def identity_env(self) -> dict[str, str]:
        """``HOME``, ``USER``, ``LOGNAME`` and ``SHELL`` of this account."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}


def lookup_user(username: str, *, purpose: str) -> RunAs:
    """The local account ``username``. Raises RuntimeError when there is none (the message
    ends with ``purpose``, why the account is needed, e.g. "batch jobs run as the user who asks
    for the cluster, so nothing was submitted") and when it is root, never run as. Blocking
    (``pwd`` may ask a directory service): call it through `asyncio.to_thread`."""
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        raise RuntimeError(
            f"User {username!r} has no account on the gateway's host; {purpose}"
        ) from None
    if entry.pw_uid == 0:
        raise RuntimeError(f"User {username!r} is root; the gateway does not run clusters as root")
    return RunAs.from_pwd(entry)
