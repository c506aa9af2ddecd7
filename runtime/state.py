"""State that survives applies: breakers, outlier ejections, rate buckets, budgets, mirrors.

A RouteTable is rebuilt on every apply, but some things must not start over when it
is: requests in flight still hold circuit-breaker slots, an endpoint that was failing
stays ejected, a rate-limit bucket that is empty stays empty. The `StateRegistry`
(one per proxy, in `ChainDeps`) hands the chain builders the same object for the same
service across applies:

    registry.breaker("reviews", config)     # limits updated in place, slots kept
    registry.outliers("reviews", config)    # per-endpoint history kept
    registry.bucket("ratings", config, now) # kept while the config is unchanged
    registry.budget("reviews")              # retries in flight
    registry.mirrors                        # the proxy-wide bound on mirror copies

`retain` drops the state of services and endpoints that are gone.

Building a table must not change live state: a bundle can still be rejected after
its table is built (golden requests, a failed check), and the live config must then
be exactly what it was. So a build goes through `registry.transaction()`, which hands
out the same objects but defers every change (new limits, new buckets, new entries)
until `commit()`, which the applier calls right at the swap.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from starmesh.bundle.spec import CircuitBreaker, OutlierDetection, RateLimit
from starmesh.runtime.filters.circuit_breaker import BreakerState
from starmesh.runtime.filters.mirror import MirrorSlots
from starmesh.runtime.filters.outlier import OutlierState
from starmesh.runtime.filters.rate_limit import TokenBucket
from starmesh.runtime.filters.retry import RetryBudget

__all__ = ["StateRegistry", "StateSource", "StateTransaction"]


class StateSource(Protocol):
    """What the chain builders ask for: a registry, or a transaction over one."""

    @property
    def mirrors(self) -> MirrorSlots: ...

    def breaker(self, service: str, config: CircuitBreaker) -> BreakerState: ...

    def outliers(self, service: str, config: OutlierDetection) -> OutlierState: ...

    def bucket(self, service: str, config: RateLimit, now: float) -> TokenBucket: ...

    def budget(self, service: str) -> RetryBudget: ...


class StateRegistry:
    """Per-service state objects, created on first use and reused by later applies."""

    __slots__ = ("_breakers", "_outliers", "_buckets", "_budgets", "mirrors")

    def __init__(self, *, mirror_limit: int = 64) -> None:
        self._breakers: dict[str, BreakerState] = {}
        self._outliers: dict[str, OutlierState] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self.mirrors = MirrorSlots(mirror_limit)

    def breaker(self, service: str, config: CircuitBreaker) -> BreakerState:
        """The service's breaker, with `config`'s limits (slots in flight are kept)."""
        state = self._breakers.get(service)
        if state is None:
            state = self._breakers[service] = BreakerState(service, config)
        else:
            state.configure(config)
        return state

    def outliers(self, service: str, config: OutlierDetection) -> OutlierState:
        """The service's ejections, judged by `config` from now on."""
        state = self._outliers.get(service)
        if state is None:
            state = self._outliers[service] = OutlierState(config)
        else:
            state.config = config
        return state

    def bucket(self, service: str, config: RateLimit, now: float) -> TokenBucket:
        """The service's token bucket; a new, full one when the config changed."""
        bucket = self._buckets.get(service)
        if bucket is None or bucket.config != config:
            bucket = self._buckets[service] = TokenBucket(config, now)
        return bucket

    def budget(self, service: str) -> RetryBudget:
        """The service's retry budget counters."""
        budget = self._budgets.get(service)
        if budget is None:
            budget = self._budgets[service] = RetryBudget()
        return budget

    def retain(self, services: Collection[str], endpoints: frozenset[str] | None = None) -> None:
        """Forget services not in `services` and, when given, endpoints not in `endpoints`.

        Objects still referenced by in-flight requests of an older table keep working;
        they are only no longer handed out."""
        keep = set(services)
        for table in (self._breakers, self._outliers, self._buckets, self._budgets):
            for name in [n for n in table if n not in keep]:
                del table[name]
        if endpoints is not None:
            for state in self._outliers.values():
                state.retain(endpoints)

    def transaction(self) -> StateTransaction:
        """A view for building a table: the same objects, changes deferred to commit()."""
        return StateTransaction(self)


class StateTransaction:
    """Hands out the registry's state objects; records changes and applies them on commit.

    New objects are created at once (the new table's filters hold them) but registered
    only on commit; existing objects keep their old limits until commit."""

    __slots__ = ("_registry", "_pending")

    def __init__(self, registry: StateRegistry) -> None:
        self._registry = registry
        self._pending: list[Callable[[], None]] = []

    @property
    def mirrors(self) -> MirrorSlots:
        return self._registry.mirrors

    def breaker(self, service: str, config: CircuitBreaker) -> BreakerState:
        state = self._registry._breakers.get(service)
        if state is None:
            state = BreakerState(service, config)
            self._pending.append(lambda: self._registry._breakers.__setitem__(service, state))
        else:
            self._pending.append(lambda: state.configure(config))
        return state

    def outliers(self, service: str, config: OutlierDetection) -> OutlierState:
        state = self._registry._outliers.get(service)
        if state is None:
            state = OutlierState(config)
            self._pending.append(lambda: self._registry._outliers.__setitem__(service, state))
        else:
            self._pending.append(lambda: setattr(state, "config", config))
        return state

    def bucket(self, service: str, config: RateLimit, now: float) -> TokenBucket:
        bucket = self._registry._buckets.get(service)
        if bucket is None or bucket.config != config:
            bucket = TokenBucket(config, now)
            self._pending.append(lambda: self._registry._buckets.__setitem__(service, bucket))
        return bucket

    def budget(self, service: str) -> RetryBudget:
        budget = self._registry._budgets.get(service)
        if budget is None:
            budget = RetryBudget()
            self._pending.append(lambda: self._registry._budgets.__setitem__(service, budget))
        return budget

    def commit(self) -> None:
        """Apply every deferred change, in the order the build asked for them."""
        pending, self._pending = self._pending, []
        for change in pending:
            change()
