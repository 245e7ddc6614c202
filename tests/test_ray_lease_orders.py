"""The lease protocol between LeasedSlots and ClusterLimiter, under every order its messages can take.

Every call a worker makes is a message that this test delivers when it chooses (Hypothesis draws the
schedule): late, out of order, twice (a retried Ray call), or never answered because the caller was
cancelled while the call still runs at the limiter. Meanwhile the driver reclaims leases, leases lapse,
workers die, and a worker's closing is cancelled. After every step the books must agree: what a worker
holds on its current lease the limiter counts, and the limiter never grants past the limit. At the end,
with every attempt finished and every worker closed, every slot is back (no lease had to lapse for it):
nothing granted, no ValueError, nothing hung.

Deterministic: no Ray, one event loop, a limiter clock that moves only when the schedule says so, and
no timer that can fire within a test (the steward runs its rounds when the schedule says so).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.distributed.limiter import ClusterLimiter
from runner.distributed.slots import LeasedSlots
from runner.distributed.terms import Holding, LeaseLost

LIMIT = 3
WEIGHTS = {"die": 1, "reclaim": 1, "lapse": 1, "cancel": 1}  # rare; every other kind 4
FOREVER = 1e9  # a lease timeout and a report period no test reaches: time moves only by `lapse`


class Refused(Exception):
    """An attempt the endpoint refused for too many requests in flight."""


@dataclass(eq=False)
class Call:
    """One call from a worker to the limiter: a message on the wire, then a run at the limiter."""

    worker: str
    name: str
    args: tuple[Any, ...]
    reply: asyncio.Future[Any]  # what the caller awaits
    runs: list[asyncio.Task[Any]] = field(default_factory=list)  # deliveries (a duplicate is a second)
    answered: bool = False  # the caller has its reply, or was cut off

    def __repr__(self) -> str:  # without the worker's random instance id, so a schedule replays
        shown = [a for a in self.args[1:] if not (isinstance(a, str) and len(a) > 8)]
        return f"{self.worker}.{self.name}{tuple(shown)}"


class Wire:
    """The network between the workers and one in-process limiter; the test moves every message."""

    def __init__(self, limiter: ClusterLimiter) -> None:
        self.limiter = limiter
        self.calls: list[Call] = []
        self.bugs: list[BaseException] = []  # anything the limiter raised besides LeaseLost

    def handle(self, worker: str) -> Any:
        wire = self

        class Handle:
            def __getattr__(self, name: str) -> Any:
                async def send(*args: Any) -> Any:
                    call = Call(worker, name, args, asyncio.get_running_loop().create_future())
                    wire.calls.append(call)
                    return await call.reply

                return SimpleNamespace(remote=send)

        return Handle()

    def deliver(self, call: Call, patient: bool) -> None:
        """Run the call at the limiter (once more, if it ran before: a retried call). A patient acquire
        waits there for a free slot until `tick` has moved the clock on by a second; an impatient one
        answers 0 at once if none is free."""
        args = call.args
        if call.name == "acquire":
            args = (args[0], args[1], 1.0 if patient else 0.0, *args[3:])
        call.runs.append(asyncio.create_task(getattr(self.limiter, call.name)(*args)))

    def answer(self, call: Call) -> None:
        """The first run's outcome reaches the caller."""
        run = call.runs[0]
        call.answered = True
        if call.reply.done():
            return
        if run.exception() is not None:
            call.reply.set_exception(cast(BaseException, run.exception()))
        else:
            call.reply.set_result(run.result())

    def cut(self, call: Call) -> None:
        """The caller stops waiting (it was cancelled); the message still travels and runs."""
        call.answered = True
        call.reply.cancel()

    def audit(self) -> None:
        for call in self.calls:
            for run in call.runs:
                if run.done() and not run.cancelled() and run.exception() is not None:
                    exc = run.exception()
                    if not isinstance(exc, LeaseLost) and exc not in self.bugs:
                        self.bugs.append(cast(BaseException, exc))

    def undelivered(self) -> list[Call]:
        return [c for c in self.calls if not c.runs]

    def unanswered(self) -> list[Call]:
        return [c for c in self.calls if c.runs and c.runs[0].done() and not c.answered]

    def running(self) -> list[asyncio.Task[Any]]:
        return [run for c in self.calls for run in c.runs if not run.done()]


@dataclass(eq=False)
class Worker:
    """A worker actor's pool and the attempts it runs; `dead` once its process is gone."""

    name: str
    slots: LeasedSlots
    attempts: list[tuple[asyncio.Task[None], asyncio.Event, list[bool]]] = field(default_factory=list)
    rounds: list[asyncio.Task[Any]] = field(default_factory=list)
    closer: asyncio.Task[None] | None = None
    dead: bool = False

    def start(self) -> None:
        gate, refuse = asyncio.Event(), [False]

        async def attempt() -> None:
            async with self.slots.slot(1):
                await gate.wait()
                if refuse[0]:
                    raise Refused

        self.attempts.append((asyncio.create_task(attempt()), gate, refuse))

    def running(self) -> list[tuple[asyncio.Task[None], asyncio.Event, list[bool]]]:
        return [a for a in self.attempts if not a[0].done()]

    def busy(self) -> bool:
        return bool(self.running()) or any(not t.done() for t in self.rounds)

    def tasks(self) -> list[asyncio.Task[Any]]:
        own = [self.slots._fetch, self.slots._steward, self.slots._closer, self.closer]
        return [a[0] for a in self.attempts] + self.rounds + [t for t in own if t is not None]


async def settle() -> None:
    """Let every task run until each waits on a message, a gate or the schedule (no timer fires)."""
    for _ in range(30):
        await asyncio.sleep(0)


class Scenario:
    def __init__(self, workers: int, idle: bool) -> None:
        self.now = 0.0
        self.limiter = ClusterLimiter(concurrency=LIMIT, lease_timeout_s=FOREVER, clock=lambda: self.now)
        self.wire = Wire(self.limiter)
        self.workers = [
            Worker(
                f"w{i}",
                LeasedSlots(
                    self.wire.handle(f"w{i}"),
                    f"w{i}",
                    max_grant=2,
                    idle_s=0.0 if idle else FOREVER,
                    report_s=FOREVER,
                    classify=lambda e: ("concurrency", None) if isinstance(e, Refused) else (None, None),
                    clock=lambda: self.now,
                ),
            )
            for i in range(workers)
        ]
        self.driver: list[asyncio.Task[int]] = []  # the driver's reclaim calls
        self.taken_back = False  # a lease was reclaimed or lapsed, or a worker died: its attempts ran on

    def live(self) -> list[Worker]:
        return [w for w in self.workers if not w.dead]

    def actions(self) -> dict[str, list[tuple[str, Any]]]:
        """What may happen next, by kind; the schedule picks a kind, then one of its actions."""
        acts: dict[str, list[tuple[str, Any]]] = {}

        def add(kind: str, label: str, act: Any) -> None:
            acts.setdefault(kind, []).append((label, act))

        for w in self.live():
            if w.closer is None:
                add("start", f"{w.name} starts an attempt", w.start)
                if not any(not t.done() for t in w.rounds):
                    add("round", f"{w.name}'s steward runs a round", lambda w=w: self.round(w))
                    add("round", f"{w.name}'s steward heartbeats", lambda w=w: self.round(w, heartbeat=True))
                if not w.busy():
                    add("close", f"{w.name} closes", lambda w=w: self.close(w))
            elif not w.closer.done():
                add("cancel", f"{w.name}'s closing is cancelled", w.closer.cancel)
            for _task, gate, refuse in w.running()[:1]:
                add("end", f"{w.name} ends an attempt", gate.set)
                add(
                    "end",
                    f"{w.name} ends an attempt, refused",
                    lambda g=gate, r=refuse: (r.__setitem__(0, True), g.set()),
                )
            add("die", f"{w.name} dies", lambda w=w: self.kill(w))
            add("reclaim", f"the driver reclaims {w.name}", lambda w=w: self.reclaim(w))
        for call in self.wire.calls:
            if not call.runs:
                add("deliver", f"deliver {call}", lambda c=call: self.wire.deliver(c, patient=False))
                add("deliver", f"deliver {call}, waiting", lambda c=call: self.wire.deliver(c, patient=True))
            elif len(call.runs) < 3:
                add("again", f"deliver {call} again", lambda c=call: self.wire.deliver(c, patient=False))
            if call.runs and call.runs[0].done() and not call.answered:
                add("answer", f"answer {call}", lambda c=call: self.wire.answer(c))
            if not call.answered:
                add("cut", f"cut {call}", lambda c=call: self.cut(c))
        add("lapse", "every lease lapses", self.lapse)
        add("tick", "a second passes", self.tick)
        return acts

    def round(self, w: Worker, heartbeat: bool = False) -> None:
        if heartbeat:
            w.slots._last_report = self.now - FOREVER  # a heartbeat is due: it reports whatever it has
        w.rounds.append(asyncio.create_task(w.slots.steward_round()))

    def close(self, w: Worker) -> None:
        w.closer = asyncio.create_task(w.slots.aclose())

    def cut(self, call: Call) -> None:
        self.wire.cut(call)

    def reclaim(self, w: Worker) -> None:
        self.taken_back = True
        self.driver.append(asyncio.create_task(self.limiter.reclaim(w.name)))

    def kill(self, w: Worker) -> None:
        self.taken_back = True
        w.dead = True
        for task in w.tasks():
            task.cancel()

    def tick(self) -> None:
        """A second passes: acquires waiting at the limiter time out (the limiter's own timed wake is a
        no-op while its clock stands still, so no real timer decides anything)."""
        self.now += 1.0
        self.limiter._notify()

    def lapse(self) -> None:
        self.taken_back = True
        self.now += FOREVER * 2  # every lease not waiting at the limiter is reaped at its next call

    def check(self) -> None:
        """The books after a step: the limiter's invariants, and every worker's holding counted."""
        self.wire.audit()
        assert not self.wire.bugs, self.wire.bugs
        self.limiter._check()
        assert 0 <= self.limiter._granted <= LIMIT
        if not self.taken_back:  # else attempts of a lease taken back may still run, as designed
            assert sum(w.slots.in_use for w in self.live()) <= LIMIT
        for w in self.live():
            slots = w.slots
            assert slots.free >= 0 and slots.in_use - slots._unbacked <= slots.held, slots.describe()
            lease = self.limiter._leases.get(w.name)
            if lease is not None and lease.number == slots._lease_number:
                assert slots.held <= lease.granted, (w.name, slots.describe(), lease)
            for task in w.tasks():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    assert isinstance(task.exception(), Refused), task.exception()

    async def drain(self) -> None:
        """Finish the run with every message delivered and answered in order: all slots come back."""
        for _ in range(40):
            for w in self.live():
                for _task, gate, _refuse in w.running():
                    gate.set()
            for call in self.wire.undelivered():
                self.wire.deliver(call, patient=True)
            await settle()
            for call in self.wire.unanswered():
                self.wire.answer(call)
            await settle()
            for w in self.live():
                if w.closer is None and not w.busy():
                    self.close(w)  # hands back everything it holds
                elif w.closer is None and not any(not t.done() for t in w.rounds):
                    self.round(w)  # returns what it owes to workers waiting
            for w in self.workers:
                if w.dead:
                    await self.limiter.reclaim(w.name)  # the driver saw it die
            self.tick()
            await settle()
            self.check()
            done = all(
                w.closer is not None and w.closer.done() and (w.slots._closer is None or w.slots._closer.done())
                for w in self.live()
            )
            if done and not self.wire.undelivered() and not self.wire.unanswered() and not self.wire.running():
                break
        else:
            pytest.fail(f"the run did not finish: {self.wire.running()} {[w.slots.describe() for w in self.live()]}")
        for w in self.live():
            assert w.closer is not None and (w.closer.cancelled() or w.closer.exception() is None), w.closer
        # Every slot back without a lease lapsing: a worker cancelled inside aclose handed its slots back too.
        assert self.limiter._granted == 0, (self.limiter._leases, [w.slots.describe() for w in self.workers])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data(), workers=st.integers(1, 3), idle=st.booleans(), steps=st.integers(5, 60))
def test_every_order_of_lease_messages_keeps_the_books(
    data: st.DataObject, workers: int, idle: bool, steps: int
) -> None:
    async def scenario() -> None:
        run = Scenario(workers, idle)
        try:
            for _ in range(steps):
                kinds = run.actions()
                weights = [kind for kind in kinds for _ in range(WEIGHTS.get(kind, 4))]
                kind = data.draw(st.sampled_from(weights), label="kind")
                choices = dict(kinds[kind])
                label = data.draw(st.sampled_from(sorted(choices)), label="step")
                act = choices[label]
                act()
                await settle()
                run.check()
            await run.drain()
        finally:
            for w in run.workers:
                for task in w.tasks():
                    task.cancel()
            for task in run.wire.running():
                task.cancel()
            await settle()

    asyncio.run(scenario())


# -- the same rules, one message order each -------------------------------------------------------------


async def test_a_grant_whose_answer_never_reached_the_worker_is_taken_back_at_its_next_report() -> None:
    limiter = ClusterLimiter(concurrency=4, lease_timeout_s=60.0)
    lease = (await limiter.join("w0", "i", 1)).lease
    assert await limiter.acquire("w0", 3, 0.0, lease, 1) == 3  # the worker was cancelled before the answer came
    assert await limiter.acquire("w0", 3, 0.0, lease, 1) == 0  # the same call again (a retry) grants nothing more
    await limiter.report("w0", Holding(lease, 1, held=0, settled=1))  # call 1 ended here with nothing received
    assert (await limiter.stats())["granted"] == 0
    assert await limiter.acquire("w0", 3, 0.0, lease, 1) == 0  # and if it arrives only now, still nothing


async def test_a_report_that_arrives_late_or_twice_changes_nothing() -> None:
    limiter = ClusterLimiter(concurrency=4, lease_timeout_s=60.0)
    lease = (await limiter.join("w0", "i", 1)).lease
    assert await limiter.acquire("w0", 3, 0.0, lease, 1) == 3
    late = Holding(lease, 1, held=3, settled=1)  # sent, then held up on the wire
    newer = Holding(lease, 2, held=1, settled=1)  # two slots handed back since
    await limiter.report("w0", newer)
    await limiter.report("w0", late)
    await limiter.report("w0", newer)
    assert (await limiter.stats())["granted"] == 1


async def test_a_join_that_arrives_twice_keeps_the_lease_it_made() -> None:
    limiter = ClusterLimiter(concurrency=4, lease_timeout_s=60.0)
    first = await limiter.join("w0", "i", 1)
    assert await limiter.acquire("w0", 2, 0.0, first.lease, 1) == 2
    assert (await limiter.join("w0", "i", 1)).lease == first.lease  # the same join again: nothing dropped
    assert (await limiter.stats())["granted"] == 2
    second = await limiter.join("w0", "i", 2)  # a new join of the worker: the old lease's slots come back
    assert second.lease != first.lease and (await limiter.stats())["granted"] == 0


async def test_a_worker_whose_acquire_was_cut_off_says_so_at_its_next_round() -> None:
    limiter = ClusterLimiter(concurrency=2, lease_timeout_s=FOREVER, clock=lambda: 0.0)
    wire = Wire(limiter)
    slots = LeasedSlots(wire.handle("w0"), "w0", report_s=FOREVER, idle_s=FOREVER, clock=lambda: 0.0)
    worker = Worker("w0", slots)
    worker.start()  # an attempt waiting for a slot

    async def through(name: str, cut: bool = False) -> None:
        await settle()
        call = next(c for c in wire.calls if c.name == name and not c.runs)
        wire.deliver(call, patient=False)
        await settle()
        if cut:
            wire.cut(call)
        else:
            wire.answer(call)
        await settle()

    await through("join")
    await through("acquire", cut=True)  # granted at the limiter; the worker stopped waiting for the answer
    assert limiter._granted == 1 and slots.held == 0
    round_ = asyncio.create_task(slots.steward_round())  # no heartbeat due, nothing handed back: yet it reports
    await through("report")
    assert await round_ and limiter._granted == 0
    for task in worker.tasks() + wire.running():
        task.cancel()
    await settle()


async def test_a_worker_cancelled_while_it_closes_still_hands_its_slots_back() -> None:
    """aclose waits for the acquire under way before its last report; a caller cancelled meanwhile gets
    its CancelledError at once, and the slots (those held, and the grant still on the wire) go back to
    the limiter without waiting for the lease to time out."""
    limiter = ClusterLimiter(concurrency=4, lease_timeout_s=FOREVER, clock=lambda: 0.0)
    wire = Wire(limiter)
    slots = LeasedSlots(wire.handle("w0"), "w0", max_grant=2, report_s=FOREVER, idle_s=FOREVER, clock=lambda: 0.0)
    worker = Worker("w0", slots)

    async def through(name: str) -> None:
        await settle()
        call = next(c for c in wire.calls if c.name == name and not c.runs)
        wire.deliver(call, patient=False)
        await settle()
        wire.answer(call)
        await settle()

    for _ in range(3):
        worker.start()  # three attempts wait for slots
    await through("join")
    await through("acquire")  # two granted: two attempts run, the third asks for more
    for _task, gate, _refuse in worker.attempts:
        gate.set()  # the third takes a slot the first two freed, and all three end
    await settle()
    assert not worker.running() and slots.held == 2
    acquiring = next(c for c in wire.calls if c.name == "acquire" and not c.runs)  # still on the wire

    closer = asyncio.create_task(slots.aclose())
    await settle()  # aclose waits for the acquire under way
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer  # the cancellation reaches the caller
    wire.deliver(acquiring, patient=False)
    await settle()
    wire.answer(acquiring)  # two more granted, arriving after the close began
    await settle()
    reports = [c for c in wire.calls if c.name == "report" and not c.runs]
    assert reports, "the closing stopped with its caller: nothing hands the slots back before the lease lapses"
    await through("report")  # its last report hands back all four

    assert limiter._granted == 0, limiter._leases
    for task in worker.tasks() + wire.running():
        task.cancel()
    await settle()
