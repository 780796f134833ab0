"""How deep speculative decoding drafts, job by job, from what it measures as the engine runs.

Nothing here touches a model or the clock: the speculator reports the seconds its iterations took
and what each job's verification accepted, and :class:`SpecPolicy` turns them into a draft depth
for every job of the next iteration (0: decode incrementally). Tests drive it with made-up
measurements.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flockctl.engine.job import Job, JobSpec

#: A drafted token's chance of acceptance at a position where nothing has been measured yet.
PRIOR_ACCEPTANCE = 0.6
#: The engine-wide rate at a position counts as this many of a job's own steps there.
PRIOR_WEIGHT = 2.0
#: Per step, a job's earlier counts fade by this factor: its estimate follows about its last ten.
JOB_DECAY = 0.9
#: The engine-wide counts fade far slower: they are the prior of every new job.
ENGINE_DECAY = 0.995
#: Engine-wide, a position past the first starts from the rate of the one before it, worth
#: this many drafts there (the first starts from PRIOR_ACCEPTANCE, worth one). Worth one, a
#: single rejected probe halved a position's rate and every deeper one's with it, and the
#: policy never drafted that deep again: on the demo pair it stayed incremental in a third of
#: the runs, where depth 6-8 made 1.2-1.4x.
POSITION_PRIOR_WEIGHT = 4.0
#: Each verified tree token past the first, as a share of an incremental step, until two tree
#: sizes are measured at a batch size (a 5-token verification cost 1.44 one-token steps on a CPU).
NODE_COST = 0.1
#: An SSM forward that catches its cache up by more tokens than this (a job's first speculative
#: step, or its first after incremental ones) is no steady step: its timing is not a step cost.
STEADY_CATCHUP = 4
#: A job whose own best depth is 0 tries speculation again for this many steps in a row: its
#: first step pays the SSM's catch-up, the next ones are timed.
PROBE_STEPS = 2
#: Each round of probes that finds speculation still losing doubles the wait before the next
#: one, up to this many times ``probe_every``: a job the draft cannot follow stops paying a
#: round every ``probe_every`` steps (on a weak draft, with decode steps of under a
#: millisecond, that cost a tenth of its tokens/s), and a job whose probe pays starts over.
#: A new job starts from the wait of the engine's latest round.
MAX_BACKOFF = 4
#: Until a batch size's costs are measured, speculative steps go this deep (at most the tree's
#: depth); deeper ones are read off a line from it and measured once the policy picks them.
#: Measuring at the whole tree (8 deep) cost about 6 incremental steps a step on a weak draft.
MEASURE_DEPTH = 2
#: A batch size the policy found losing at every depth is judged again after this many decode
#: iterations (sooner when a job's probe is due).
RECHECK = 8
#: Timings older than this many decode iterations give way to newer ones (the newest
#: ``KEEP_SAMPLES`` stay): what a stall measured must not decide long after it ended.
HORIZON = 128
KEEP_SAMPLES = 3


@dataclass
class SpecState(JobSpec):
    """One job's speculation: the counters ``/jobs/{id}`` shows, the draft depth the policy chose
    for its latest step (0: it decoded incrementally), and its acceptance per draft position as
    fading counts: ``tried[i]`` steps reached position ``i``, ``hits[i]`` of them accepted it."""

    depth: int = 0
    probing: int = 0  # probe steps left in a row (see PROBE_STEPS)
    backoff: int = 1  # rounds of probes wait backoff * probe_every steps (see MAX_BACKOFF)
    tried: list[float] = field(default_factory=list)
    hits: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "depth": self.depth}


def count_acceptance(
    tried: list[float],
    hits: list[float],
    depth: int,
    accepted: int,
    decay: float,
    fade_untried: bool = False,
) -> None:
    """One step that drafted ``depth`` positions, the first ``accepted`` of them accepted: every
    position up to the first rejection was tried (those after it never got a chance). With
    ``fade_untried`` the counts of the positions not tried fade too, so that the prior they are
    weighed against takes over again as they age."""
    while len(tried) < depth:
        tried.append(0.0)
        hits.append(0.0)
    reached = min(accepted + 1, depth)
    for i in range(reached):
        tried[i] = tried[i] * decay + 1.0
        hits[i] = hits[i] * decay + (1.0 if i < accepted else 0.0)
    if fade_untried:
        for i in range(reached, len(tried)):
            tried[i] *= decay
            hits[i] *= decay


def expected_tokens(rates: Sequence[float]) -> list[float]:
    """Tokens a step emits at each depth ``0 ... len(rates)``, from the chance ``rates[i]`` that
    position ``i`` is accepted once every position before it was: the accepted drafts plus the
    LLM's own token."""
    out, reach = [1.0], 1.0
    for rate in rates:
        reach *= rate
        out.append(out[-1] + reach)
    return out


class _Recent:
    """The median of the last ``window`` samples: a step that another process stalled on a busy
    machine moves it by one place, not by its whole length (as it would a moving average)."""

    def __init__(self, window: int = 15):
        self.samples: deque[float] = deque(maxlen=window)
        self.taken: deque[int] = deque(maxlen=window)  # the decode iteration of each sample
        self.value = 0.0
        self.count = 0

    def add(self, x: float, now: int = 0) -> None:
        self.samples.append(x)
        self.taken.append(now)
        self.value = statistics.median(self.samples)
        self.count += 1

    def forget_before(self, oldest: int, keep: int) -> bool:
        """Drop the samples taken before iteration ``oldest``, the newest ``keep`` aside;
        whether any went."""
        dropped = False
        while len(self.samples) > keep and self.taken[0] < oldest:
            self.samples.popleft()
            self.taken.popleft()
            dropped = True
        if dropped:
            self.value = statistics.median(self.samples)
        return dropped

    def fresh(self, oldest: int) -> int:
        """Samples taken at iteration ``oldest`` or later."""
        return sum(1 for t in self.taken if t >= oldest)

    def latest(self, n: int = 3) -> float:
        """The median of the newest ``n`` samples: what the machine does about now."""
        return statistics.median(list(self.samples)[-n:])


class StepCosts:
    """Costs measured per batch size: an incremental iteration, one SSM forward, and the
    verification of a tree of ``n`` tokens per job (the LLM forward, the walk, the kept path).

    A speculative iteration of depth ``d`` costs one verification plus ``d - 1`` forwards of
    each SSM: each SSM's first forward (which catches its cache up and drafts the first depth)
    and the trees' Python count with the verification, a fixed cost of every speculative step
    whatever its depth; only the SSMs' forwards past their first are timed per forward. With
    the fused forward, a greedy chain's further depths are one compiled call, each depth about
    a tenth of a millisecond on the demo's draft, against half a millisecond or more for the
    rest of the drafting: counted alike, depth 2 measured made every deeper depth look about
    three times as dear as it was. Verification at any tree size is read off a line through the
    sizes measured (the padded batch makes every job's tree as large as the largest one's).

    The speculative parts are kept in incremental steps: each timing is divided by the latest
    incremental steps at its batch size, and read back times the incremental median of now. On a
    machine whose other tenants come and go, a probe timed while they ran is compared with the
    incremental steps timed just before it, not with ones timed when the machine was quiet (in
    seconds, one loaded probe made speculation look twice as dear as it was)."""

    def __init__(self, min_samples: int = 3) -> None:
        self.min_samples = min_samples
        self.incremental: dict[int, _Recent] = {}
        self.draft: dict[int, _Recent] = {}
        self.verify: dict[int, dict[int, _Recent]] = {}
        self.now = 0  # decode iterations observed
        # per batch size, (forwards, tokens) -> a speculative step in incremental steps, until
        # that batch size's draft or verification timings change: the policy reads every depth
        # each iteration, and a line fit a depth cost as much as a decode step of a small model
        self._in_steps: dict[int, dict[tuple[int, int], float | None]] = {}
        self._fits: dict[int, tuple[dict[int, float], tuple[float, float, float]] | None] = {}

    def add_incremental(self, batch: int, seconds: float) -> None:
        self.now += 1
        inc = self.incremental.setdefault(batch, _Recent())
        inc.add(seconds, self.now)
        # the speculative parts are read in incremental steps from now on (the first), and
        # which sizes were timed lately moves on
        self._forget_fit(batch)

    def add_speculative(
        self, batch: int, forwards: int, draft_seconds: float, tokens: int, verify_seconds: float
    ) -> None:
        """Kept in incremental steps; not kept before an incremental step was timed."""
        self.now += 1
        inc = self.incremental.get(batch)
        if inc is None or not inc.samples:
            return
        unit = inc.latest()
        if unit <= 0:
            return
        if forwards:
            self.draft.setdefault(batch, _Recent()).add(draft_seconds / forwards / unit, self.now)
        self.verify.setdefault(batch, {}).setdefault(tokens, _Recent()).add(
            verify_seconds / unit, self.now
        )
        self._forget_fit(batch)

    def forget_old(self, batch: int, horizon: int = HORIZON, keep: int = KEEP_SAMPLES) -> None:
        """Timings at this batch size older than ``horizon`` iterations give way to newer ones
        (each keeps its newest ``keep``): the side the policy has not picked for a while (its
        probes are rare) is not judged by what a stall long ago measured."""
        oldest = self.now - horizon
        inc = self.incremental.get(batch)
        if inc is not None:
            inc.forget_before(oldest, keep)
        recents = [self.draft.get(batch), *self.verify.get(batch, {}).values()]
        if any(r is not None and r.forget_before(oldest, keep) for r in recents):
            self._forget_fit(batch)

    def _forget_fit(self, batch: int) -> None:
        self._in_steps.pop(batch, None)
        self._fits.pop(batch, None)

    def samples(self, batch: int) -> tuple[int, int]:
        """Incremental and speculative iterations measured at this batch size."""
        inc = self.incremental.get(batch)
        return (
            inc.count if inc else 0,
            sum(e.count for e in self.verify.get(batch, {}).values()),
        )

    def verify_seconds(self, batch: int, tokens: int) -> float | None:
        inc = self.incremental.get(batch)
        steps = self.verify_steps(batch, tokens)
        return None if steps is None or inc is None else steps * inc.value

    def verify_steps(self, batch: int, tokens: int) -> float | None:
        """Verifying trees of ``tokens`` tokens, in incremental steps."""
        fit = self._fits.get(batch)
        if fit is None:
            fit = self._fits[batch] = self._fit(batch)
        if fit is None:
            return None
        own, line = fit
        if tokens in own:
            return own[tokens]
        n, value, slope = line
        return max(0.0, value + slope * (tokens - n))

    def _fit(self, batch: int) -> tuple[dict[int, float], tuple[float, float, float]] | None:
        """The sizes whose own timings stand, and the line that gives the others (a point and
        a slope), until this batch size's timings change."""
        points = self.verify.get(batch)
        inc = self.incremental.get(batch)
        if not points or not inc or not inc.count:
            return None
        # sizes timed often within the horizon: where two are, a size the policy stopped
        # picking counts no more, its own timings or in the line. It keeps its newest few,
        # which may be a stall's: three taken hundreds of iterations before set a 4-deep
        # chain's cost 0.35 ms above what it cost, and the policy kept to depth 1, two thirds
        # of depth 3's tokens a second. (Where fewer are, as while speculation is off and only
        # its probes time it, the newest timings of each size stand.)
        oldest = self.now - HORIZON
        fresh = {n: e.fresh(oldest) for n, e in points.items()}
        lately = [n for n in points if fresh[n] >= self.min_samples]
        if len(lately) >= 2:
            xs = lately
            ws = [float(fresh[x]) for x in xs]
        else:
            # a size timed often enough keeps its own cost: no line bends it
            lately = [n for n, e in points.items() if len(e.samples) >= self.min_samples]
            if len(points) == 1:
                ((n, e),) = points.items()
                return {n: e.value} if n in lately else {}, (n, e.value, NODE_COST)
            # a line through the measured sizes, each weighted by its recent samples: a size
            # the policy no longer picks keeps a few old timings, which must not outweigh fresh
            # ones; sizes timed only once or twice (a stall makes them far off) stay out of it
            # when two sizes were timed more often
            xs = lately if len(lately) >= 2 else list(points)
            ws = [float(len(points[x].samples)) for x in xs]
        ys = [points[x].value for x in xs]
        total = sum(ws)
        mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / total
        my = sum(w * y for w, y in zip(ws, ys, strict=True)) / total
        spread = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
        slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True)) / spread
        # more tokens never verify faster
        return {n: points[n].value for n in lately}, (mx, my, max(0.0, slope))

    def speculative(self, batch: int, forwards: int, tokens: int) -> float | None:
        """Seconds of a speculative iteration with ``forwards`` SSM forwards and trees of
        ``tokens`` tokens; None until both parts were measured at this batch size."""
        inc = self.incremental.get(batch)
        if inc is None:
            return None
        known = self._in_steps.setdefault(batch, {})
        if (forwards, tokens) not in known:
            verify, draft = self.verify_steps(batch, tokens), self.draft.get(batch)
            known[forwards, tokens] = (
                None
                if verify is None or (forwards and not draft)
                else verify + forwards * (draft.value if draft else 0.0)
            )
        steps = known[forwards, tokens]
        return None if steps is None else steps * inc.value

    def describe(self, batch: int) -> dict[str, Any]:
        """Milliseconds at the machine's speed of now (the parts measured relative to it)."""
        inc, draft = self.incremental.get(batch), self.draft.get(batch)
        verify = sorted(self.verify.get(batch, {}).items())
        unit = inc.value * 1e3 if inc else 0.0
        return {
            "incremental_ms": round(unit, 3) if inc else None,
            "draft_forward_ms": round(draft.value * unit, 3) if draft and inc else None,
            "verify_ms_by_tokens": {str(n): round(e.value * unit, 3) for n, e in verify},
        }


class SpecPolicy:
    """How deep each job drafts: ``on`` always the whole tree, ``off`` never, ``auto`` as deep
    as pays, measured.

    Under ``auto``, a job's chance of acceptance at each draft position comes from its own recent
    steps, with the engine-wide rate at that position as a prior (worth ``prior_weight`` steps),
    so a new job starts from what the others did and then follows its own text. From those the
    policy expects ``E(d)`` tokens from a step of depth ``d`` (the tree cut to its first ``d``
    levels; 0 is an incremental step), and from :class:`StepCosts` a step of depth ``d`` at this
    batch size costs ``C(d)`` seconds. Each job's own best depth maximises ``E(d) / C(d)``; the
    batch then takes the depth ``D`` that makes the most tokens a second over all its jobs, each
    job drafting ``min(D, its best)`` (the padded forward costs what its deepest tree does).
    A job whose best is 0 tries again every ``probe_every`` iterations, at the depth the
    engine-wide rates would give it. Until a batch size's costs are measured, the policy measures
    them: speculative iterations at the whole tree, incremental ones interleaved. After that, one
    iteration in ``probe_every`` at a batch size that speculates is incremental, so that both
    sides of the comparison follow a machine whose speed drifts (other work on its cores).
    """

    def __init__(
        self,
        mode: str = "auto",
        tree: Sequence[int] = (1, 1, 1, 1),
        drafters: int = 1,
        *,
        probe_every: int = 32,
        min_samples: int = 3,
        prior_weight: float = PRIOR_WEIGHT,
    ):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"unknown speculation mode {mode!r}: expected auto, on or off")
        self.mode = mode
        self.tree = tuple(tree)
        self.drafters = drafters
        self.probe_every = probe_every
        self.min_samples = min_samples
        self.prior_weight = prior_weight
        self.costs = StepCosts(min_samples)
        self.tried: list[float] = []  # engine-wide, per position (see SpecState)
        self.hits: list[float] = []
        self._engine_rates: list[float] | None = None  # rates() of the counts above, kept
        # the backoff of the latest round of probes that began (1 once a probe paid): a new
        # job's first probe waits as long, so short jobs on a draft that keeps losing skip it
        self.backoff = 1
        # batch -> until which decode iteration (costs.now) these jobs stay plain, and why
        self._plain_until: dict[int, tuple[int, list[str], str]] = {}
        self._tree_tokens = [self._count_tree_tokens(d) for d in range(len(self.tree) + 1)]
        self.depth_by_batch: dict[int, int] = {}
        self.device_on = True
        self.reason = "" if mode != "off" else "--spec off"
        self._since_probe = 0
        self._since_incremental: dict[int, int] = {}  # batch -> speculative iterations in a row
        #: batch sizes whose speculative steps draft on another thread while the model verifies
        #: (a lone job's pipelined runs): a step's cost is its verification's, the drafting
        #: hidden but where a guess failed (which the run's timings hold)
        self.overlapped: set[int] = set()

    @property
    def max_depth(self) -> int:
        return len(self.tree)

    @property
    def measure_depth(self) -> int:
        return min(MEASURE_DEPTH, self.max_depth)

    def _probe_due(self, job: Job) -> bool:
        """Whether ``job`` (losing at every depth) tries speculation this iteration."""
        state = job.spec
        assert isinstance(state, SpecState)
        return bool(state.probing) or state.skipped + 1 >= self.probe_every * state.backoff

    def tree_tokens(self, depth: int) -> int:
        """Tokens of one job's merged tree at ``depth`` (at most: SSMs that agree share nodes)."""
        return self._tree_tokens[depth]

    def _count_tree_tokens(self, depth: int) -> int:
        level, nodes = 1, 0
        for width in self.tree[:depth]:
            level *= width
            nodes += level
        return 1 + self.drafters * nodes

    def step_seconds(self, batch: int, depth: int) -> float | None:
        """What an iteration of this depth costs at this batch size (0: incremental)."""
        if depth == 0:
            inc = self.costs.incremental.get(batch)
            return inc.value if inc and inc.count else None
        forwards = 0 if batch in self.overlapped else (depth - 1) * self.drafters
        return self.costs.speculative(batch, forwards, self.tree_tokens(depth))

    def cost_ratio(self, batch: int, depth: int | None = None) -> float | None:
        """A speculative step of ``depth`` (default: the one chosen last) in incremental steps."""
        depth = self.depth_by_batch.get(batch, self.max_depth) if depth is None else depth
        spec, inc = self.step_seconds(batch, max(1, depth)), self.step_seconds(batch, 0)
        return spec / inc if spec is not None and inc else None

    def rates(self, state: SpecState | None = None) -> list[float]:
        """Chance of acceptance at each position: engine-wide, or for one job with that prior.
        A position nobody reached yet takes the rate of the one before (so depth can grow)."""
        if self._engine_rates is None:  # the policy reads them several times an iteration
            engine: list[float] = []
            previous = PRIOR_ACCEPTANCE
            for i in range(self.max_depth):
                tried = self.tried[i] if i < len(self.tried) else 0.0
                hits = self.hits[i] if i < len(self.hits) else 0.0
                w = POSITION_PRIOR_WEIGHT if i else 1.0
                previous = (hits + w * previous) / (tried + w)
                engine.append(previous)
            self._engine_rates = engine
        out = list(self._engine_rates)
        if state is None:
            return out
        w = self.prior_weight
        for i in range(min(len(state.tried), len(out))):
            out[i] = (state.hits[i] + w * out[i]) / (state.tried[i] + w)
        return out

    def choose(self, jobs: Sequence[Job]) -> dict[str, int]:
        """The draft depth of each decoding job that speculates this iteration, by job id (each
        job has a ``SpecState``, which shows its depth); empty: an incremental step."""
        depths = self._choose(jobs)
        for job in jobs:
            if isinstance(job.spec, SpecState):
                job.spec.depth = depths.get(job.id, 0)
                job.spec.enabled = job.spec.depth > 0
        return depths

    def _choose(self, jobs: Sequence[Job]) -> dict[str, int]:
        if self.mode == "off" or not jobs:
            return {}
        if self.mode == "on":
            return {job.id: self.max_depth for job in jobs}
        batch = len(jobs)
        inc_samples, spec_samples = self.costs.samples(batch)
        if spec_samples < self.min_samples:
            self.device_on, self.reason = True, f"measuring speculation at batch size {batch}"
            # speculative timings are kept relative to incremental ones: one of those first
            return {job.id: self.measure_depth for job in jobs} if inc_samples else {}
        if inc_samples < self.min_samples:
            self.device_on, self.reason = True, f"measuring decoding at batch size {batch}"
            self._since_probe += 1
            if self._since_probe >= 2:  # interleave: learn the incremental cost too
                self._since_probe = 0
                return {}
            return {job.id: self.measure_depth for job in jobs}
        until, decided, reason = self._plain_until.get(batch, (-1, [], ""))
        if (
            self.costs.now < until
            and decided == [job.id for job in jobs]
            and not any(self._probe_due(job) for job in jobs)
        ):
            # decided lately for these jobs, and none of their probes is due
            self.device_on, self.reason = False, reason
            return {}
        whole = {job.id: self.max_depth for job in jobs}
        self.costs.forget_old(batch)
        costs = [self.step_seconds(batch, d) for d in range(self.max_depth + 1)]
        if any(c is None or c <= 0 for c in costs):
            return whole
        if self._since_incremental.get(batch, 0) + 1 >= self.probe_every:
            return {}  # time an incremental step again: the machine's speed drifts
        seconds = [float(c) for c in costs if c is not None]
        engine_best = max(1, _best_depth(expected_tokens(self.rates()), seconds))
        gains: list[list[float]] = []
        best: list[int] = []
        probes: list[int] = []
        for job in jobs:
            state = job.spec
            assert isinstance(state, SpecState)
            gain = expected_tokens(self.rates(state))
            gains.append(gain)
            own = _best_depth(gain, seconds)
            if own:
                state.probing = 0
                state.backoff = self.backoff = 1
            elif self._probe_due(job):
                # a losing job tries again now and then, a few steps in a row: the first one
                # catches the SSM's cache up and is not timed (see observe_speculative); the
                # next round waits longer unless one of this round's pays
                own = engine_best
                probes.append(own)
                if not state.probing:
                    state.backoff = min(2 * state.backoff, MAX_BACKOFF)
                    self.backoff = state.backoff  # new jobs start from it (Speculator.job_spec)
                state.probing = (state.probing or PROBE_STEPS) - 1
            best.append(own)
        rates = []
        for depth in range(self.max_depth + 1):
            tokens = sum(g[min(depth, b)] for g, b in zip(gains, best, strict=True))
            rates.append(tokens / seconds[depth])
        depth = max(range(self.max_depth + 1), key=lambda d: (rates[d], -d))
        if depth == 0 and probes:
            depth = max(probes)
        self.depth_by_batch[batch] = depth
        speedup = rates[depth] / rates[0]
        ratio = seconds[depth] / seconds[0]
        tokens = rates[depth] * seconds[depth] / batch
        if depth == 0 or not any(best):
            self.device_on = False
            one = max(1, engine_best)
            self.reason = (
                f"a speculative step of depth {one} costs {seconds[one] / seconds[0]:.2f}"
                f" incremental steps and yields {expected_tokens(self.rates())[one]:.2f} tokens"
                " a job"
            )
            # judged again after RECHECK decode iterations (or a job's probe): with decode
            # steps under a millisecond, judging every one cost a twentieth of them
            self._plain_until[batch] = (
                self.costs.now + RECHECK,
                [job.id for job in jobs],
                self.reason,
            )
            return {}
        self._plain_until.pop(batch, None)
        self.device_on = True
        self.reason = (
            f"depth {depth}: {tokens:.2f} tokens a job for {ratio:.2f} incremental steps"
            f" ({speedup:.2f}x incremental)"
        )
        return {job.id: min(depth, b) for job, b in zip(jobs, best, strict=True) if b}

    def observe_incremental(self, batch: int, seconds: float) -> None:
        """An incremental decode iteration of ``batch`` jobs took ``seconds``."""
        self.costs.add_incremental(batch, seconds)
        self._since_incremental[batch] = 0

    def observe_speculative(
        self,
        batch: int,
        forwards: int,
        draft_seconds: float,
        tokens: int,
        verify_seconds: float,
        catchup: int = 1,
    ) -> None:
        """A speculative iteration: ``forwards`` SSM forwards took ``draft_seconds`` in all,
        verifying trees of up to ``tokens`` tokens took ``verify_seconds``; the SSMs' first
        forward caught their caches up by at most ``catchup`` tokens a job.

        An iteration whose catch-up was longer than a steady step's (1 or 2 tokens: the LLM's
        own token and the last draft, which no SSM ran) is not timed: the first step after a run
        of incremental ones feeds the SSM every token since, and timed, it made a probe look
        far dearer than speculating in a row costs, so auto stayed incremental."""
        if catchup <= STEADY_CATCHUP:
            self.costs.add_speculative(batch, forwards, draft_seconds, tokens, verify_seconds)
        self._since_incremental[batch] = self._since_incremental.get(batch, 0) + 1

    def observe_job(self, job: Job, depth: int, drafted: int, accepted: int) -> None:
        """A job's step: ``depth`` positions drafted (0: decoded incrementally), ``drafted``
        tree nodes, ``accepted`` of its drafts accepted."""
        state = job.spec
        assert state is not None
        if not depth:
            state.skipped += 1
            return
        state.skipped = 0
        state.steps += 1
        state.draft_tokens += drafted
        state.accepted_tokens += accepted
        emitted = accepted + 1
        alpha = max(1 / state.steps, 0.05)
        previous = state.emitted_ewma if state.emitted_ewma is not None else emitted
        state.emitted_ewma = previous + alpha * (emitted - previous)
        if isinstance(state, SpecState):
            # a job's own misses deeper than it now drafts fade: held, one rejection at the
            # second position kept a job at depth 1 to its end (it never drafted that deep
            # again to see the draft agree), a third fewer tokens a second than depth 3
            count_acceptance(state.tried, state.hits, depth, accepted, JOB_DECAY, True)
        count_acceptance(self.tried, self.hits, depth, accepted, ENGINE_DECAY)
        self._engine_rates = None
        self._plain_until.clear()  # acceptance moved: judge every batch size again

    def describe(self) -> dict[str, Any]:
        ratios, costs = {}, {}
        for batch in sorted(self.costs.verify):
            c = self.cost_ratio(batch)
            if c is not None:
                ratios[str(batch)] = round(c, 3)
            costs[str(batch)] = self.costs.describe(batch)
        return {
            "mode": self.mode,
            "active": self.mode == "on" or (self.mode == "auto" and self.device_on),
            "reason": self.reason,
            "max_depth": self.max_depth,
            "depth_by_batch": {str(b): d for b, d in sorted(self.depth_by_batch.items())},
            "cost_ratio_by_batch": ratios,
            "acceptance_by_pos": [round(r, 4) for r in self.rates()],
            "step_costs_by_batch": costs,
        }


def _best_depth(gain: Sequence[float], seconds: Sequence[float]) -> int:
    """The depth with the most tokens a second (the shallower one on a tie)."""
    return max(range(len(seconds)), key=lambda d: (gain[d] / seconds[d], -d))
