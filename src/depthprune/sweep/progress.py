"""What a sweep shows while it runs: a ``[k/N]`` counter over all its points (finished ones of earlier runs
included), one line per stage of a point, a line every few seconds of a stage that draws no bar of its own,
and an estimate of the time left from the measured time of the finished points.

Lines go through the sweep's ``log`` callable (standard output by default); bars are tqdm's, on standard
error, and only where the caller asks for them (``quiet`` turns them off: one line per stage, for logs).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

# A stage without a bar says it is still running this often (seconds): quiet runs write to logs, less often.
HEARTBEAT_S = 10.0
QUIET_HEARTBEAT_S = 60.0
KINDS = ("unhealed", "healed")


def kind(heal: str) -> str:
    """The kind of a point for the estimate: healed points take far longer than unhealed ones."""
    return "unhealed" if heal == "none" else "healed"


def duration(seconds: float) -> str:
    """'7 s', '3m05s', '1h02m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def estimate(times: dict[str, list[float]], remaining: Iterable[str]) -> tuple[float, list[str]]:
    """Seconds the ``remaining`` points (their kinds) should take from the median time of each kind, and the
    kinds with no measured point (counted as the longest known kind: the estimate is then a lower bound)."""
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    fallback = max(medians.values(), default=0.0)
    left = list(remaining)
    unknown = sorted({k for k in left if k not in medians})
    return sum(medians.get(k, fallback) for k in left), unknown


@contextmanager
def library_bars_off(off: bool = True) -> Iterator[None]:
    """Inside, the Hugging Face libraries draw no progress bars (loading or writing weights, downloads),
    as with ``quiet``; their settings are restored on leaving."""
    if not off:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    restore = []
    if transformers_logging.is_progress_bar_enabled():
        transformers_logging.disable_progress_bar()
        restore.append(transformers_logging.enable_progress_bar)
    if not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        restore.append(hub.enable_progress_bars)
    datasets = sys.modules.get("datasets")
    if datasets is not None and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    env = os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS")  # for a first import of datasets inside
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = env
        for enable in restore:
            enable()


class _Ticker:
    """Calls ``beat(elapsed)`` every ``interval`` seconds from a thread until stopped."""

    def __init__(self, interval: float, beat: Callable[[float], None]):
        self.interval, self.beat, self.start = interval, beat, time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat(time.monotonic() - self.start)
            except Exception:  # noqa: BLE001 - a progress line must never break the work it reports on
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


class SweepProgress:
    """The sweep's counter, stage lines and estimate.

    ``points``: the keys and kinds of every point of the sweep; ``seconds``: key -> the seconds each
    finished point took, as stored (so a resumed sweep counts on and estimates from the start).
    """

    def __init__(self, log: Callable[[str], None], points: list[tuple[str, str]], seconds: dict[str, float],
                 done: set[str], quiet: bool = False, cost_phase: bool = True, cost_seconds: float | None = None):
        self.log, self.quiet, self.total = log, quiet, len(points)
        self.kinds = dict(points)
        self.done = {key for key in self.kinds if key in done}
        self.times: dict[str, list[float]] = {k: [] for k in KINDS}
        for key in self.done:
            if key in seconds:
                self.times[self.kinds[key]].append(seconds[key])
        self.cost_phase, self.cost_seconds = cost_phase, cost_seconds
        self.prefix = ""
        self.heartbeat = QUIET_HEARTBEAT_S if quiet else HEARTBEAT_S
        self.parallel = 1  # points that run at once (a Ray cluster's task slots): the estimate divides by it

    @property
    def bars(self) -> bool:
        """Whether the work may draw its own tqdm bars (not when quiet)."""
        return not self.quiet

    def say(self, text: str) -> None:
        self.log(f"{self.prefix}{text}" if self.prefix else text)

    def begin(self) -> None:
        """The opening line: how many points, how many already finished, and the estimate if one can be made."""
        self.log(f"{self.total} points, {len(self.done)} already finished")
        if any(self.times.values()):
            self.log_eta()

    @contextmanager
    def point(self, key: str) -> Iterator[None]:
        """Everything said inside is prefixed '[k/N] key: ', k counting the points finished before (in any run)."""
        self.prefix = f"[{len(self.done) + 1}/{self.total}] {key}: "
        try:
            yield
        finally:
            self.prefix = ""

    def finished(self, key: str, seconds: float) -> None:
        """Count the point as done in ``seconds`` and say the new estimate."""
        self.done.add(key)
        self.times[self.kinds[key]].append(seconds)
        self.log_eta()

    def log_eta(self) -> None:
        left = [k for key, k in self.kinds.items() if key not in self.done]
        known = ", ".join(f"{k} {duration(statistics.median(v))} each (median of {len(v)})"
                          for k, v in self.times.items() if v)
        if not left:
            cost = f"; cost phase about {duration(self.cost_seconds)}" if self.cost_phase and self.cost_seconds else ""
            self.log(f"ETA: all {self.total} points finished ({known}){cost}")
            return
        seconds, unknown = estimate(self.times, left)
        at_once = min(self.parallel, len(left))
        seconds /= at_once  # the points' own times add up; k at a time end k times sooner
        counts = ", ".join(f"{left.count(k)} {k}" for k in KINDS if k in left)
        counts += f"; {at_once} at a time" if at_once > 1 else ""
        bound = "at least " if unknown else "about "
        cost = "" if not self.cost_phase else f" + the cost phase (about {duration(self.cost_seconds)} last time)" \
            if self.cost_seconds else " + the cost phase"
        note = f"; no {' or '.join(unknown)} point timed yet" if unknown else ""
        ends = time.strftime("%H:%M", time.localtime(time.time() + seconds + (self.cost_seconds or 0)))
        self.log(f"ETA: {len(left)} point{'s' * (len(left) > 1)} left ({counts}), {bound}{duration(seconds)}{cost}, ends ~{ends} "
                 f"[{known}{note}]")

    @contextmanager
    def stage(self, text: str, has_bar: bool = False, detail: Callable[[], str | None] | None = None) -> Iterator[None]:
        """Say ``text`` now; while the stage runs without a bar of its own (``has_bar`` false, or always when
        quiet), say every few seconds that it still runs, with ``detail()`` if it has something to add."""
        self.say(text)
        if has_bar and self.bars:
            yield
            return
        name = text.split(" (")[0].split(":")[0]

        def beat(elapsed: float) -> None:
            extra = detail() if detail is not None else None
            self.say(f"{name}: still running after {duration(elapsed)}" + (f", {extra}" if extra else ""))

        ticker = _Ticker(self.heartbeat, beat)
        try:
            yield
        finally:
            ticker.stop()
