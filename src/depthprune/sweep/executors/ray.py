"""A sweep's points as Ray tasks: ``depthprune sweep ... --ray [ADDRESS]``, on one machine or a cluster.

``--ray`` alone starts a local Ray instance; ``--ray auto`` joins the cluster this machine belongs to
(``ray start --head`` / ``ray start --address=HEAD:6379``); ``--ray HOST:PORT`` names its head, and
``--ray ray://HOST:10001`` connects through Ray Client. A named address that does not answer within
:data:`CONNECT_TIMEOUT_S` seconds fails at once, before the model is loaded or anything is written.

What runs where:

- the driver (the ``depthprune sweep`` process) does everything the serial sweep does around the points:
  checks, OUT's lock, the model, the one analysis (measured once, or read from ``OUT/analysis``), the
  cost phase at the end and the summary. It chooses every point's layers (:func:`~depthprune.sweep.point.
  select_point`) and sends the :class:`~depthprune.select.Selection` with the task, by value: the
  workers never measure distances;
- each point is one task reserving ``ray_cpus`` CPUs, and with device cuda/auto ``ray_heal_gpus`` GPUs
  when healed, ``ray_eval_gpus`` when not (settings; a GPU task's worker is Ray's one-task process, so its
  memory is returned). A task loads the model itself (once per worker process on CPUs), runs
  :func:`~depthprune.sweep.point.run_point` and returns the row; it writes no row;
- the driver alone writes ``results.sqlite``: each row in one transaction as it arrives. A task that
  raises, or whose worker dies (killed, out of memory), leaves its point in the ``failed`` table with the
  error; the other points finish; the sweep then skips the cost phase and exits non-zero with a one-line
  summary. Rerunning the same command runs only the points not finished, i.e. the failed ones;
- killing the driver ends its tasks (Ray cancels the tasks of a dead driver); the rows saved so far stay,
  and the rerun continues from them, healings from their checkpoints.

A cluster needs, on every node: depthprune installed (``pip install 'depthprune[ray]'``), the model and
the data at the same paths (or hub ids), and OUT on a filesystem they all share at the same path (NFS,
...): healings write their checkpoints under ``OUT/points`` from whichever node runs them. Without a shared
OUT the results are still right (rows travel to the driver), but a killed healing starts over.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ...errors import DepthpruneError
from ..plan import Point
from ..point import record_point, run_point, select_point, stored_predictions
from ..progress import SweepProgress, duration, library_bars_off
from ..store import UNPRUNED, save_failure

CONNECT_TIMEOUT_S = 10.0
CANCEL_WAIT_S = 15.0  # how long a stopping driver waits for its cancelled tasks to end
INSTALL_HINT = "pip install 'depthprune[ray]' (or pip install 'ray[default]')"
# Tests only: "KEY|MARKER|exit" (or "|raise"), several joined by ';': the task of point KEY exits its worker
# process at once (or raises), the first time (it creates the file MARKER); every later attempt runs normally.
FAULT_ENV = "DEPTHPRUNE_TEST_RAY_FAULT"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise DepthpruneError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """A named head (HOST:PORT or ray://HOST:PORT) must accept a connection within CONNECT_TIMEOUT_S."""
    if address in ("local", "auto"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DepthpruneError(f"--ray '{address}' is not a Ray address: use --ray (a local instance), --ray auto, "
                              "--ray HOST:PORT or --ray ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__).lower()
        raise DepthpruneError(f"cannot reach the Ray cluster at '{address}' ({why} within {CONNECT_TIMEOUT_S:g} s): "
                              "start it with `ray start --head` there, or check the address and port") from None


class Cluster:
    """A connection to Ray for one sweep: :func:`connect` opens it (or reuses one already open in this
    process, e.g. a test's local instance), :meth:`close` closes what it opened."""

    def __init__(self, ray, address: str, opened: bool):
        self.ray, self.address, self.opened = ray, address, opened

    def resources(self) -> dict:
        return self.ray.cluster_resources()

    def slots(self, c) -> int:
        """How many point tasks of sweep ``c`` the cluster runs at once (by its CPUs, and its GPUs on a GPU sweep)."""
        r = self.resources()
        counts = [r.get("CPU", 0) / c.ray_cpus] if c.ray_cpus else []
        if c.device != "cpu":
            counts += [r.get("GPU", 0) / g for g in (c.ray_eval_gpus, c.ray_heal_gpus) if g]
        return max(1, int(min(counts, default=1)))

    def describe(self) -> str:
        r = self.resources()
        gpus = f", {r['GPU']:g} GPUs" if r.get("GPU") else ""
        return f"Ray ({'a local instance' if self.address == 'local' else self.address}: {r.get('CPU', 0):g} CPUs{gpus})"

    def close(self) -> None:
        if self.opened and self.ray.is_initialized():
            self.ray.shutdown()


def connect(address: str) -> Cluster:
    """Connect to Ray (``address``: 'local', 'auto', HOST:PORT or ray://HOST:PORT); one-line errors."""
    ray = _import_ray()
    _check_reachable(address)
    if ray.is_initialized():
        return Cluster(ray, address, opened=False)
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False)
        else:  # a cluster's own settings (and Ray Client's few init arguments) stay as they are
            ray.init(address=address)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (is a cluster running here? `ray start --head`)" if address == "auto" else \
            " (is it a Ray head, and does this process have the cluster's RAY_AUTH_TOKEN if it uses one?)"
        raise DepthpruneError(f"cannot connect to Ray at '{address}'{hint}: {first}") from None
    return Cluster(ray, address, opened=True)


def open_cluster(address: str, c, log) -> Cluster:
    """Connect to Ray before anything is loaded or written (a bad address fails fast), and check that a
    point's task fits in the cluster at all."""
    cluster = connect(address)
    try:
        check_resources(cluster, c, healing=any(h != "none" for h in c.heal))
    except BaseException:
        cluster.close()
        raise
    log(f"points run as tasks on {cluster.describe()}")
    return cluster


def check_resources(cluster: Cluster, c, healing: bool) -> None:
    """A task that asks for more than the whole cluster has would wait for ever: refuse it now."""
    have = cluster.resources()
    wants = [("CPU", c.ray_cpus, "--ray-cpus")]
    if c.device != "cpu":
        wants.append(("GPU", c.ray_eval_gpus, "--ray-eval-gpus"))
        if healing:
            wants.append(("GPU", c.ray_heal_gpus, "--ray-heal-gpus"))
        if c.ray_eval_gpus == 0 or (healing and c.ray_heal_gpus == 0):
            raise DepthpruneError(f"device {c.device} runs every point on a GPU: --ray-eval-gpus and --ray-heal-gpus "
                                  "must be above 0 (a fraction such as 0.5 shares one)")
    for kind, amount, flag in wants:
        if amount > have.get(kind, 0):
            raise DepthpruneError(f"{flag} {amount:g}, but the Ray cluster has {have.get(kind, 0):g} {kind}s in all: no "
                                  f"point could ever start; lower {flag} or add nodes")


def task_resources(c, point: Point) -> dict:
    """What one point's task reserves: ``ray_cpus`` CPUs, and on GPUs the healed or the unhealed share."""
    gpus = 0.0 if c.device == "cpu" else (c.ray_heal_gpus if point.healed else c.ray_eval_gpus)
    return {"num_cpus": c.ray_cpus, "num_gpus": gpus}


def run_points(cluster: Cluster, c, work: Path, db, todo: list[Point], total: int, context,
               progress: SweepProgress) -> list[tuple[str, str]]:
    """Run ``todo`` as Ray tasks and save each row as it arrives; returns the (key, error) of the failed ones,
    each also recorded in the ``failed`` table. The full model's point runs first, alone: the others are
    compared with its choices (agreement)."""
    first = [p for p in todo if p.criterion == UNPRUNED]
    failures = _run_wave(cluster, c, work, db, first, total, context, progress, None) if first else []
    rest = [p for p in todo if p.criterion != UNPRUNED]
    return failures + _run_wave(cluster, c, work, db, rest, total, context, progress, stored_predictions(db))


def _run_wave(cluster: Cluster, c, work: Path, db, todo: list[Point], total: int, context,
              progress: SweepProgress, reference) -> list[tuple[str, str]]:
    """Send ``todo`` at once and save each row as it arrives (see :func:`run_points`)."""
    ray = cluster.ray
    task = ray.remote(_point_task)
    pending = {}
    for point in todo:
        options = {**task_resources(c, point), "max_retries": 0, "retry_exceptions": False,
                   "name": f"depthprune {point.key}"}
        pending[task.options(**options).remote(c, str(work), point, select_point(point, context), total,
                                               reference)] = point
    progress.parallel = cluster.slots(c)
    progress.say(f"{len(todo)} points sent to {cluster.describe()}, each task {c.ray_cpus:g} CPU(s)"
                 + (f", {c.ray_heal_gpus:g} GPU(s) healed / {c.ray_eval_gpus:g} unhealed" if c.device != "cpu" else ""))
    failures: list[tuple[str, str]] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(ready[0])
            key = point.key
            try:
                row = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - what a task raised, or its worker's death: the point failed
                error = failure_line(exc)
                save_failure(db, n=point.n, criterion=point.criterion, heal=point.heal, error=error,
                             repair=point.repair, granularity=point.granularity)
                failures.append((key, error))
                progress.say(f"{key}: FAILED ({error}); recorded, the other points go on")
                continue
            with progress.point(key):
                record_point(c, work, db, row, progress)
            progress.finished(key, row["details"]["seconds"])
    except BaseException:  # the driver is stopping (Ctrl-C, SIGTERM, a bug): its tasks stop too
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001,S110 - already finished or gone
                pass
        # Cancelling is asynchronous: wait (a little) until they are gone, so that a rerun started at once
        # does not meet a healing still holding its point's folder.
        try:
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
        except Exception:  # noqa: BLE001,S110 - the driver is leaving anyway
            pass
        raise
    return failures


def failure_line(exc: BaseException) -> str:
    """One line for what ended a task: the exception it raised (unwrapped from Ray's), or its worker's death."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None and not isinstance(cause, rex.RayTaskError):
            exc = cause
    text = " ".join(str(exc).split())
    if isinstance(exc, (rex.WorkerCrashedError, rex.NodeDiedError, rex.ActorDiedError)) or \
            type(exc).__name__ in ("OutOfMemoryError", "LocalRayletDiedError"):
        return f"worker died ({type(exc).__name__}): {text[:300]}"
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


def summary(failures: list[tuple[str, str]], points: int, out: Path) -> str:
    """The sweep's one-line error when points failed."""
    shown = "; ".join(f"{key} ({error[:120]})" for key, error in failures[:3])
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    return (f"{len(failures)} of {points} points failed: {shown}{more}; the other points are saved and the errors "
            f"recorded in {out / 'results.sqlite'} (table failed): rerun the same command to retry only these")


# ---------------------------------------------------------------------------------------- in the worker

_LOADED: dict = {}  # (model, device, dtype) -> (model, tokenizer): a CPU worker loads its model once
_CALIBRATION: dict = {}  # (model, data settings) -> the calibration token ids repaired points fit on


def _worker_model(c):
    from ...model.load import load_model

    key = (c.model, c.device, c.dtype)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_model(c.model, device=c.device, dtype=c.dtype)
    return _LOADED[key]


def _worker_sequences(c, tokenizer) -> list[list[int]]:
    """The sweep's calibration text as token ids, read in the worker (the same text the driver reads)."""
    from ..cut import calibration_sequences
    from ..settings import _data_options

    key = (c.model, repr(_data_options(c)))
    if key not in _CALIBRATION:
        _CALIBRATION.clear()
        _CALIBRATION[key] = calibration_sequences(c, tokenizer)
    return _CALIBRATION[key]


def _fault(key: str) -> None:
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        target, marker, how = (spec.split("|") + ["", ""])[:3]
        if target != key or not marker or Path(marker).exists():
            continue
        Path(marker).write_text(f"{os.getpid()}\n")
        if how == "raise":
            raise RuntimeError(f"fault injected into {key} ({FAULT_ENV})")
        os._exit(17)  # the worker process dies mid-task, as a killed or out-of-memory worker does


def _point_task(c, work: str, point: Point, selection, total: int, reference=None) -> dict:
    """One point in a Ray worker: load (or reuse) the model, run the point, return its row."""
    key = point.key
    _fault(key)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    with library_bars_off(True):
        model, tokenizer = _worker_model(c)
        progress = SweepProgress(log, [], {}, set(), quiet=True)
        progress.prefix = f"{key}: "
        progress.say(f"started on {socket.gethostname()} (pid {os.getpid()}, model ready after "
                     f"{duration(time.perf_counter() - start)})")
        sequences = _worker_sequences(c, tokenizer) if point.repaired else None
        return run_point(model, tokenizer, c, Path(work), point, selection, total, progress, sequences, reference)
