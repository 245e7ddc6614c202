"""The errors glm-batch raises on purpose, each with the exit code it ends a run with."""

from __future__ import annotations


class GlmBatchError(Exception):
    """A failure the CLI reports as one clear line and turns into `exit_code`."""

    exit_code = 1


class NothingToDo(GlmBatchError):
    """The job is fine but has no rows to process; the CLI prints this as a notice and exits 0."""

    exit_code = 0


class UsageError(GlmBatchError):
    """The spec, an input or a command-line argument is wrong; no request has been sent."""

    exit_code = 2


class EndpointAborted(GlmBatchError):
    """The endpoint answered in a way that would fail every row (bad key, no balance, unknown model)."""

    exit_code = 3


class BudgetExhausted(GlmBatchError):
    """The run stopped dispatching because the next request could take spend past run.max_cost."""

    exit_code = 4


class LockHeld(GlmBatchError):
    """Another live process is running the same job (the same state directory)."""

    exit_code = 75  # EX_TEMPFAIL: cron wrappers treat it as "try again later"


class DiskFull(GlmBatchError):
    """A write failed for lack of space (or quota); the run stops, keeping every answer already journalled."""

    exit_code = 5


class StateUnwritable(GlmBatchError):
    """The job's state folder stopped taking writes mid-run (read-only, deleted, a file read back torn);
    the answers held go to a rescue journal (runner.state.rescue) that the next run reads first."""

    exit_code = 74  # EX_IOERR (sysexits.h): an input/output error on a file


# A write to the job's state that failed: the run stops dispatching and rescues what it holds.
STATE_FAILURES: tuple[type[GlmBatchError], ...] = (DiskFull, StateUnwritable)


def first_line(exc: BaseException) -> str:
    """An error in one line: the first line of its message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def deliberate(group: BaseExceptionGroup[BaseException]) -> GlmBatchError | None:
    """The first error raised on purpose inside a (possibly nested) exception group, if any: a task
    group wraps what its tasks raise, and a UsageError must still reach the user as itself."""
    for exc in group.exceptions:
        found = deliberate(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, GlmBatchError):
            return found
    return None
