"""The one tuning engine: numbered trials 0..n-1, whatever generates their candidates.

For trial k: skipped when the store has it finished; else its candidate is the one the store
recorded when it first started (a retried trial keeps its values and its number), or else the
generator's for k, drawn from the finished trials below k and recorded before the fit; then the
candidate is fit by its family's plan (:class:`recvae.tuning.plans.Plan`) and the outcome
recorded. A store is :class:`MemoryStore` (the Python API without a run directory) or an Optuna
storage (:mod:`recvae.tuning.study`: a run directory's ``study.db``, or a URL several processes
share), with the same few methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from recvae.tuning.candidates import Candidate, describe
from recvae.tuning.trials import SELECTION_METRIC, Trial, fit_again, select

logger = logging.getLogger("recvae.tuning")


@dataclass
class Done:
    """A finished trial: its number, candidate, runs (Mult-VAE's heuristic: two) and the run kept."""

    number: int
    candidate: Candidate
    runs: list[Trial]
    kept: int = 0

    @property
    def value(self) -> float:
        return self.runs[self.kept].validation


@dataclass
class Claim:
    """Trial ``number`` taken by this process; ``candidate``: what it recorded before (a retry)."""

    number: int
    candidate: Candidate | None = None
    handle: object = field(default=None, repr=False)


class MemoryStore:
    """The trials of one call, kept in memory (nothing to resume)."""

    def __init__(self):
        self.done: dict[int, Done] = {}
        self.started: dict[int, Candidate] = {}

    def claim(self, n: int) -> Claim | None:
        k = next((k for k in range(n) if k not in self.done), None)
        return None if k is None else Claim(k, self.started.get(k))

    def start(self, claim: Claim, candidate: Candidate) -> None:
        self.started[claim.number] = candidate

    def finish(self, claim: Claim, done: Done) -> None:
        self.done[claim.number] = done

    def fail(self, claim: Claim, interrupted: bool) -> None:
        pass

    def run_fit(self, claim: Claim, fit):
        return fit()

    def finished(self) -> list[Done]:
        return [self.done[k] for k in sorted(self.done)]

    def history(self, k: int) -> list[Done]:
        return [d for d in self.finished() if d.number < k]


class Search:
    """Trials ``0..n-1`` of ``generator`` fit by ``plan`` and kept in ``store``. ``named``: the
    table lists every run by its name (a plain grid), else each trial by its number with its
    model (a study); ``before_trial(k, candidate)``: called as trial k starts (a test's hook)."""

    def __init__(self, generator, plan, store, n: int, named: bool, before_trial=None):
        self.generator, self.plan, self.store, self.n = generator, plan, store, n
        self.named, self.before_trial = named, before_trial
        self.own: dict[tuple[int, int], Trial] = {}  # (trial, run) -> this process's run, with its model

    def run(self) -> None:
        while (claim := self.store.claim(self.n)) is not None:
            candidate = claim.candidate
            if candidate is None:
                candidate = self.generator.candidate(claim.number, self.store.history(claim.number))
                self.store.start(claim, candidate)
            try:
                if self.before_trial is not None:
                    self.before_trial(claim.number, candidate)
                runs = self.store.run_fit(claim, lambda: self.plan.fit(candidate))
            except BaseException as e:
                self.store.fail(claim, interrupted=not isinstance(e, Exception))
                raise
            kept = runs.index(select(runs))
            self.store.finish(claim, Done(claim.number, candidate, [replace(r, estimator=None) for r in runs], kept))
            self.own.update({(claim.number, i): r for i, r in enumerate(runs)})
            if not self.named:
                r = runs[kept]
                logger.info("trial %d of %d: %s %s: validation %s %.4f (%.1f s)", claim.number, self.n,
                            candidate.model, describe(candidate.values) or "defaults", _metric_name(),
                            r.validation, sum(run.seconds for run in runs))

    def results(self) -> list[tuple[Trial, tuple[int, int]]]:
        """The table's trials, each with where its model may be found: every run of a plain grid;
        a study's trials, each its kept run under the trial's number, the other run in its note."""
        out = []
        for done in self.store.finished():
            if self.named:
                out += [(r, (done.number, i)) for i, r in enumerate(done.runs)]
                continue
            kept = done.runs[done.kept]
            others = [r for i, r in enumerate(done.runs) if i != done.kept]
            note = kept.note
            if others:
                note = "; ".join(filter(None, [f"{kept.name} run kept ({others[0].name} run: validation "
                                               f"{SELECTION_METRIC} {others[0].validation:.4f})", note]))
            row = replace(kept, name=str(done.number), note=note, seconds=sum(r.seconds for r in done.runs))
            out.append((row, (done.number, done.kept)))
        return out

    def estimator_of(self, where: tuple[int, int], trial: Trial, train, validation):
        """The chosen trial's fitted model: this process's own when it kept it, else fitted again
        from the trial's exact parameters (the same weights: every fit is seeded)."""
        own = self.own.get(where)
        if own is not None and own.estimator is not None:
            return own.estimator
        logger.info("fitting the chosen model (trial %s) again: its trial kept no model, or ran before a resume "
                    "or in another process", trial.name)
        return fit_again(trial, train, validation)


def _metric_name() -> str:
    name, k = SELECTION_METRIC.split("@")
    return f"{name.upper()}@{k}"
