"""Chaos on three replicas: clusters made, scaled and stopped through random replicas while
replicas are SIGKILLed and restarted; afterwards every cluster is as last asked, nothing more.

Owns `run_chaos` (the seeded loop: ``GATEWAY_CHAOS_SEED`` replays a run,
``GATEWAY_CHAOS_SECONDS`` sets its length), `check_settled` (the end state: statuses, worker
counts, the Dask processes of each cluster by their working directory, no cluster lost or
doubled) and the test with our client; the original client's part is in
compat/test_chaos_original_client.py. Real `gateway serve` processes, real Dask processes
(unsafe-local), the real PostgreSQL. See "Replicas" in docs/architecture.md.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from replicaset import Replica, ReplicaSet, processes_in, replica_set, wait_for

from gateway_core.backends.kit import read_stat

LEASE_TTL = 3.0
MAX_ACTIVE = 3
"""Clusters wanted running at once (two cores: a scheduler and up to `MAX_WORKERS` workers
each, every worker a nanny and its worker process)."""
MAX_CLUSTERS = 16
"""Clusters made in all (each stays in the database, stopped or not, to be checked)."""
MAX_WORKERS = 2
TAKEOVER_BOUND = LEASE_TTL * 4 / 3 + 2.0
"""The stated bound (4/3 x lease_ttl: expiry, plus the third of it between looks), with 2 s
for the database and a loaded machine."""
SETTLE_TIMEOUT = 240.0
"""How long the end state may take once the chaos stops (takeovers, worker starts and the
heartbeat grace on a loaded two-core machine)."""


def chaos_seconds(default: float) -> float:
    return float(os.environ.get("GATEWAY_CHAOS_SECONDS", default))


def chaos_seed() -> int:
    seed = os.environ.get("GATEWAY_CHAOS_SEED")
    return int(seed) if seed else random.SystemRandom().randrange(2**32)


@define(kw_only=True)
class Wanted:
    """What was last asked of one cluster (acknowledged by a replica)."""

    name: str
    made_through: str
    running: bool = True
    count: int = 0
    unsure: int | None = None
    """A scale whose answer was an error after it may have reached the scheduler: asked
    again at the end until acknowledged."""


@define(kw_only=True)
class Kill:
    """A SIGKILL and the shards its victim held. A shard is taken over once another replica
    holds it (none can before the victim's lease expires) or the victim, restarted, took it
    back; `took` is when the last one was."""

    victim: Replica
    at: float
    shards: set[str]
    took: float | None = None


@define(kw_only=True)
class Chaos:
    replicas: ReplicaSet
    rng: random.Random
    wanted: dict[str, Wanted]
    journal: list[str]
    kills: list[Kill] = field(factory=list)
    watching: threading.Event = field(factory=threading.Event)

    def note(self, what: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {what}"
        self.journal.append(line)
        print(line, flush=True)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas.replicas if r.alive()]

    def dead(self) -> list[Replica]:
        return [r for r in self.replicas.replicas if not r.alive()]

    def active(self) -> list[Wanted]:
        return [w for w in self.wanted.values() if w.running]

    # The steps: each through a random live replica; a request never races a kill (one
    # step at a time), so every answer is the replica's.

    def create(self) -> None:
        if len(self.active()) >= MAX_ACTIVE or len(self.wanted) >= MAX_CLUSTERS:
            return
        via = self.rng.choice(self.alive())
        name = via.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
        assert name not in self.wanted, f"{via.name} handed out {name} twice"
        self.wanted[name] = Wanted(name=name, made_through=via.name)
        self.note(f"create {name} via {via.name}")

    def scale(self) -> None:
        active = self.active()
        if not active:
            return
        target = self.rng.choice(active)
        via = self.rng.choice(self.alive())
        count = self.rng.randint(0, MAX_WORKERS)
        if via.status(target.name) != "RUNNING":
            self.note(f"scale {target.name} skipped: not running yet on {via.name}")
            return
        try:
            answer = via.call("POST", f"/v1/clusters/{target.name}/scale", {"count": count})
        except urllib.error.HTTPError as exc:
            # 409: the scheduler could not be reached (or the cluster stopped meanwhile);
            # it may have taken the count before the error, so it is asked again at the end.
            assert exc.code == 409, f"scale via {via.name}: {exc.code} {exc.read()!r}"
            target.unsure = count
            self.note(f"scale {target.name} to {count} via {via.name}: 409, asked again later")
            return
        assert answer["ok"], answer
        target.count, target.unsure = count, None
        self.note(f"scale {target.name} to {count} via {via.name}")

    def stop(self) -> None:
        active = self.active()
        if len(active) < 2:
            return  # keep one running: the end state has a cluster to compute on
        target = self.rng.choice(active)
        via = self.rng.choice(self.alive())
        via.call("DELETE", f"/v1/clusters/{target.name}")
        target.running, target.unsure = False, None
        self.note(f"stop {target.name} via {via.name}")

    def kill(self) -> None:
        alive = self.alive()
        if len(alive) < 2:
            return  # never all at once
        victim = self.rng.choice(alive)
        self.sigkill(victim)
        self.note(f"SIGKILL {victim.name}")

    def sigkill(self, victim: Replica) -> None:
        held = {s for s, holder in self.replicas.holders().items() if holder == victim.replica_id}
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        self.kills.append(Kill(victim=victim, at=time.monotonic(), shards=held))

    def watch_takeovers(self) -> None:
        """In a thread until `watching` is cleared: when each kill's shards were taken over."""
        while self.watching.is_set():
            pending = [k for k in self.kills if k.took is None]
            if pending:
                back = {k.victim.name: k.victim.alive() for k in pending}
                holders = self.replicas.holders()
                now = time.monotonic()
                for kill in pending:
                    victim = kill.victim.replica_id
                    kill.shards -= {
                        s
                        for s in kill.shards
                        if holders.get(s) not in (None, victim)
                        or (holders.get(s) == victim and back[kill.victim.name])
                    }
                    if not kill.shards:
                        kill.took = now - kill.at
            time.sleep(0.1)

    def kill_owner(self) -> None:
        """SIGKILL the replica reconciling a random active cluster (maybe mid-start, mid-scale
        or mid-stop): its successor must carry on from what was stored."""
        alive = self.alive()
        active = self.active()
        if len(alive) < 2 or not active:
            return
        target = self.rng.choice(active)
        owner = self.replicas.owner(target.name)
        if owner is None or not owner.alive():
            return
        self.sigkill(owner)
        self.note(f"SIGKILL {owner.name} (owner of {target.name})")

    def restart(self) -> None:
        dead = self.dead()
        if not dead:
            return
        back = self.rng.choice(dead)
        back.start()
        self.note(f"restart {back.name}")


STEPS: list[tuple[str, float]] = [
    ("create", 1.5),
    ("scale", 4),
    ("stop", 1),
    ("kill", 1),
    ("kill_owner", 1.5),
    ("restart", 2),
]


def run_chaos(replicas: ReplicaSet, *, seconds: float, seed: int) -> Chaos:
    """Start every replica, then for ``seconds`` take random steps (`STEPS`, weighted) with a
    random pause between them; then restart the dead replicas and ask again the scales whose
    answer was an error. The clusters and what was last asked of them are in the result."""
    print(f"chaos seed {seed} ({seconds:g} s); replay with GATEWAY_CHAOS_SEED={seed}", flush=True)
    chaos = Chaos(replicas=replicas, rng=random.Random(seed), wanted={}, journal=[])
    for replica in replicas.replicas:
        replica.start()
    names = [name for name, _ in STEPS]
    weights = [weight for _, weight in STEPS]
    chaos.watching.set()
    watcher = threading.Thread(target=chaos.watch_takeovers, daemon=True)
    watcher.start()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            step: Callable[[], None] = getattr(chaos, chaos.rng.choices(names, weights)[0])
            step()
            time.sleep(chaos.rng.uniform(0.2, 1.5))
        # The last kill's shards are taken over (or its victim is back) within the bound.
        wait_for(
            "the last kill's shards are taken over",
            lambda: all(k.took is not None for k in chaos.kills),
            timeout=TAKEOVER_BOUND * 2,
        )
    finally:
        chaos.watching.clear()
        watcher.join()
    took = [round(k.took, 1) for k in chaos.kills if k.took is not None]
    chaos.note(f"takeovers after {len(took)} SIGKILLs took (s): {took}")
    for replica in chaos.dead():
        replica.start()
        chaos.note(f"restart {replica.name} (end of chaos)")
    for wanted in chaos.active():
        if wanted.unsure is None:
            continue

        def asked(w: Wanted = wanted) -> bool:
            via = chaos.rng.choice(chaos.alive())
            try:
                if via.status(w.name) != "RUNNING":
                    return False
                via.call("POST", f"/v1/clusters/{w.name}/scale", {"count": w.unsure})
            except urllib.error.HTTPError:
                return False
            return True

        wait_for(f"{wanted.name} takes its scale again", asked, timeout=SETTLE_TIMEOUT)
        assert wanted.unsure is not None
        wanted.count, wanted.unsure = wanted.unsure, None
        chaos.note(f"scale {wanted.name} to {wanted.count} (asked again)")
    return chaos


# -------------------------------------------------------------------------------------------
# The end state


def children(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids``."""
    from gateway_core.backends.kit import all_stats

    parents: dict[int, list[int]] = {}
    for st in all_stats():
        if st.state != "Z":
            parents.setdefault(st.ppid, []).append(st.pid)
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def differences(chaos: Chaos) -> list[str]:
    """What differs from the state last asked for (empty once settled): per cluster, its
    status on every replica, its workers in the database, and its processes."""
    replicas = chaos.replicas
    problems: list[str] = []
    rows = replicas.rows()
    if set(rows) != set(chaos.wanted):
        problems.append(f"clusters in the database {sorted(rows)} != made {sorted(chaos.wanted)}")
    running = processes_in(replicas.folder / "clusters")
    for name in set(running) - set(chaos.wanted):
        problems.append(f"processes {sorted(running[name])} in the directory of unknown {name}")
    for wanted in chaos.wanted.values():
        name = wanted.name
        expect = "RUNNING" if wanted.running else "STOPPED"
        for replica in replicas.replicas:
            seen = replica.status(name)
            if seen != expect:
                problems.append(f"{name}: {seen} on {replica.name}, wanted {expect}")
        pids = running.get(name, set())
        if not wanted.running:
            if pids:
                problems.append(f"{name}: stopped but processes {sorted(pids)} are left")
            if (replicas.folder / "clusters" / name).exists():
                problems.append(f"{name}: stopped but its directory is left")
            continue
        refs = replicas.processes(name)
        workers = {w: ref for w, ref in refs.items() if w != "scheduler"}
        states = replicas.worker_states(name)
        ready = sorted(w for w, (status, target) in states.items() if status == "RUNNING")
        active = sorted(w for w, (status, _) in states.items() if status in ("PENDING", "RUNNING"))
        if "scheduler" not in refs or not refs["scheduler"].running():
            problems.append(f"{name}: no live scheduler recorded")
        if len(ready) != wanted.count or len(active) != wanted.count:
            problems.append(
                f"{name}: workers running {ready}, active {active}; wanted {wanted.count}"
            )
        if len(workers) != wanted.count or not all(r.running() for r in workers.values()):
            problems.append(f"{name}: worker processes recorded {workers}; wanted {wanted.count}")
        known = {ref.pid for ref in refs.values()}
        expected = known | children({ref.pid for ref in workers.values()})
        if known - pids:
            problems.append(f"{name}: recorded processes {sorted(known - pids)} not found")
        extra = pids - expected
        if extra:
            described = {pid: _describe(pid) for pid in sorted(extra)}
            problems.append(f"{name}: processes nobody recorded: {described}")
    return problems


def _describe(pid: int) -> str:
    st = read_stat(pid)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        cmd = "?"
    return f"ppid {st.ppid if st else '?'}: {cmd}"


def check_takeovers(chaos: Chaos) -> None:
    """Every SIGKILLed replica's shards were held by a live replica within `TAKEOVER_BOUND`."""
    slow = [
        (k.victim.name, k.took) for k in chaos.kills if k.took is None or k.took > TAKEOVER_BOUND
    ]
    assert not slow, f"takeovers slower than {TAKEOVER_BOUND:g} s: {slow}\n" + "\n".join(
        chaos.journal
    )


def check_settled(chaos: Chaos) -> None:
    """Wait (up to `SETTLE_TIMEOUT`) until nothing differs from what was last asked; fail
    naming the differences and the seed's journal otherwise."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    problems = differences(chaos)
    while problems and time.monotonic() < deadline:
        time.sleep(1)
        problems = differences(chaos)
    assert not problems, "\n".join(
        ["not settled:", *problems, "journal:", *chaos.journal, *story(chaos, problems)]
    )
    # Settled means it stays so: a few more rounds of every check find the same.
    time.sleep(3 * LEASE_TTL)
    assert differences(chaos) == []


def story(chaos: Chaos, problems: list[str], lines: int = 40) -> list[str]:
    """For each cluster named in ``problems``: its status and reason as a live replica answers,
    and the last ``lines`` lines of each replica's log that name it (what a failed run needs
    to be understood without a replay)."""
    told: list[str] = []
    names = sorted({w.name for w in chaos.wanted.values() if any(w.name in p for p in problems)})
    for name in names:
        for replica in chaos.alive()[:1]:
            try:
                status = replica.status(name)
                reason = replica.call("GET", f"/v2/clusters/{name}/reason")["reason"]
                told.append(f"{name} on {replica.name}: {status}: {reason}")
            except (OSError, urllib.error.HTTPError) as exc:
                told.append(f"{name} on {replica.name}: {exc}")
        for replica in chaos.replicas.replicas:
            try:
                text = replica.log.read_text(errors="replace")
            except OSError:
                continue
            mentions = [line for line in text.splitlines() if name in line][-lines:]
            told.append(f"--- {replica.name}.log lines naming {name}:")
            told.extend(mentions)
    return told


def started_by(replicas: ReplicaSet, name: str) -> set[str]:
    """The replicas whose log says they started cluster ``name``'s scheduler."""
    pattern = re.compile(rf"Starting cluster {name}\b")
    return {
        r.name for r in replicas.replicas if r.log.exists() and pattern.search(r.log_tail(10**8))
    }


def other_than_starter(chaos: Chaos, name: str) -> Replica:
    """A live replica that did not start ``name`` (the proxy routes to another's cluster)."""
    starters = started_by(chaos.replicas, name)
    assert starters, f"no replica's log says it started {name}"
    others = [r for r in chaos.replicas.replicas if r.name not in starters and r.alive()]
    assert others, f"every replica started {name}: {sorted(starters)}"
    return chaos.rng.choice(others)


def finish(chaos: Chaos) -> None:
    """Stop every cluster through one replica and the replicas (SIGTERM); nothing is left."""
    replicas = chaos.replicas
    via = replicas.replicas[0]
    for wanted in chaos.active():
        via.call("DELETE", f"/v1/clusters/{wanted.name}")
    for wanted in chaos.active():
        wait_for(f"{wanted.name} stopped", lambda w=wanted: via.status(w.name) == "STOPPED")
    wait_for("no cluster process is left", lambda: not processes_in(replicas.folder / "clusters"))
    for replica in replicas.replicas:
        assert replica.stop() == 0, replica.log_tail()


@pytest.fixture
def three(tmp_path: Path, postgres_url: str) -> Iterator[ReplicaSet]:
    """Three replicas (not started) on one PostgreSQL database."""
    with replica_set(tmp_path, postgres_url, ("a", "b", "c"), lease_ttl=LEASE_TTL) as made:
        yield made


def compute(gateway_class: Any, auth: Any, replica: Replica, name: str, workers: int) -> Any:
    """Through ``replica``'s API and proxy, with a client's ``Gateway`` class and an ``auth``
    of it (ours or the original): connect, scale to one worker first if it has none, sum."""
    with gateway_class(replica.address, auth=auth) as gateway:
        cluster = gateway.connect(name)
        client = cluster.get_client(set_as_default=False)
        try:
            if not workers:
                cluster.scale(1)
            client.wait_for_workers(max(workers, 1), timeout=120)
            return client.submit(sum, range(10)).result(timeout=60)
        finally:
            client.close()
            cluster.close()


@pytest.mark.system
@pytest.mark.integration
@pytest.mark.usefixtures("no_process_left_behind")
def test_chaos_on_three_replicas_ends_as_last_asked(three: ReplicaSet) -> None:
    from gateway_client import BasicAuth, Gateway

    chaos = run_chaos(three, seconds=chaos_seconds(75), seed=chaos_seed())
    assert chaos.wanted, "the chaos made no cluster"
    assert chaos.kills, "the chaos killed no replica"
    check_takeovers(chaos)
    check_settled(chaos)
    assert chaos.active(), "the chaos left no cluster running"
    for wanted in chaos.active():
        via = other_than_starter(chaos, wanted.name)
        assert compute(Gateway, BasicAuth("alice"), via, wanted.name, wanted.count) == 45
    finish(chaos)
