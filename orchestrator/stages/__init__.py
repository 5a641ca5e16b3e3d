"""The stages of a study, one module each. Every module has one shape: its NAME, VERSION (bumped
when its algorithm changes, so cached outputs are redone), NEEDS (the stages whose outputs it
reads; a module whose inputs depend on the spec adds `needs(spec)`), `config(spec)` (the slice of the spec it depends on: its key hashes that and its
inputs' keys), `run(ctx)` (writes outputs into a private directory, returns its result),
`resources(spec)` (what it asks of the cluster, for `saferay plan`), `shown(result, dir)` (its
part of `saferay show`) and `Result` (what `run` returns, a `StageResult`: other stages read it
through its fields and `trained_models`, never a stage's JSON by key).

Stages decide where work runs (Ray Train runs, Ray Data, Ray tasks); the work itself is in `jobs/`.
"""

from __future__ import annotations

from orchestrator.stage import Stage, StageContext  # noqa: F401 (the runner's interface)
from orchestrator.stages import (align_defences, align_sft, align_vaa, attack, base, data, debias, evaluate, tune,
                                 vulnerability)

MODULES = (data, base, align_sft, vulnerability, align_vaa, align_defences, tune, attack, evaluate, debias)
STAGES: tuple[Stage, ...] = tuple(
    Stage(m.NAME, m.VERSION, getattr(m, "needs", lambda spec, fixed=m.NEEDS: fixed), m.config, m.run, m.resources,
          m.shown, m.Result)
    for m in MODULES)
BY_NAME = {s.name: s for s in STAGES}
