"""The retry budget: retries may add only a bounded share to the load on the workers.

Without one, retries multiply load exactly when the workers are failing: with three attempts a
deployment whose workers all fail sends them three times the traffic, and a worker that is slow
because it is overloaded gets more. As Finagle's ``RetryBudget`` and Envoy's ``retry_budget`` do,
a retry is allowed while the retries of the last ``window`` seconds stay within ``percent`` of the
requests of that window. A floor of ``min_per_second`` retries a second on average over the window
keeps retries possible on a quiet deployment, where a percentage of a few requests is nothing;
there a few dozen retries are no threat to anyone.

Counts live in a ring of one-second slots, so each call costs O(1) and the memory is fixed; the
window is the current second plus the ``window - 1`` whole seconds before it. The clock is
injectable, so the budget is tested (and could be replayed) without waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        percent: float = 0.2,
        window: int = 10,
        min_per_second: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if percent < 0:
            raise ValueError(f"percent must be 0 or more, got {percent}")
        if window < 1:
            raise ValueError(f"window must be at least 1 second, got {window}")
        if min_per_second < 0:
            raise ValueError(f"min_per_second must be 0 or more, got {min_per_second}")
        self.percent = percent
        self.window = window
        self.min_per_second = min_per_second
        self.clock = clock
        self._slots = window
        self._requests = [0] * self._slots
        self._retries = [0] * self._slots
        #: Requests and retries in the window, as of the last call.
        self.requests = 0
        self.retries = 0
        self._second = math.floor(clock())

    def _slot(self) -> int:
        """The current second's slot; the slots that fell out of the window are emptied."""
        second = math.floor(self.clock())
        passed = second - self._second
        if passed:
            n = self._slots
            if passed < 0 or passed >= n:
                self._requests = [0] * n
                self._retries = [0] * n
                self.requests = self.retries = 0
            else:
                for s in range(self._second + 1, second + 1):
                    i = s % n
                    self.requests -= self._requests[i]
                    self.retries -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
            self._second = second
        return second % self._slots

    def request(self) -> None:
        """Count one request (its first attempt; retries are counted by ``try_retry``)."""
        i = self._slot()
        self._requests[i] += 1
        self.requests += 1

    def try_retry(self) -> bool:
        """Whether one more retry fits the budget now; a retry allowed is counted."""
        i = self._slot()
        if self.retries + 1 > self._allowance():
            return False
        self._retries[i] += 1
        self.retries += 1
        return True

    def _allowance(self) -> float:
        """Retries the window holds: a share of its requests, or the floor if that is more."""
        return max(self.percent * self.requests, self.min_per_second * self._slots)

    def describe(self) -> str:
        """The rule, for people: the reason given when a retry is refused."""
        return (
            f"the retry budget is spent (retries are at most {self.percent:.0%} of the requests"
            f" of the last {self.window}s, or {self.min_per_second} a second)"
        )
