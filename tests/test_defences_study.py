"""A study with every baseline defence, end to end through the real CLI: Vaccine, Booster and
RepNoise trained at alignment time, SFT attacked plain and under Lisa, all scored by the same
judge into one attack table with intervals; the harmful rows Booster and RepNoise train on are
none of the attack's poison."""

import json

import pandas as pd

from conftest import ROOT, saferay
from jobs.recipes import poisoned_mix

DEFENCES = ["vaccine", "booster", "repnoise"]
MODELS = ["sft", *DEFENCES, "sft+lisa"]


def test_every_defence_gets_a_row_in_the_attack_table(smoke_store):
    # In the smoke study's store, whose data and base it adopts (same keys): only its own stages train.
    store = smoke_store
    # studies/defences-smoke.yaml with one seed and one ratio: every row, the least training.
    saferay("run", str(ROOT / "studies" / "defences-smoke.yaml"), "--set", "seeds=[0]", "--set", "attack.ratios=[0.1]",
            store=store, timeout=1500)
    shown = json.loads(saferay("show", "defences-smoke", "--json", store=store).stdout)

    assert set(shown["defences"]) == set(DEFENCES)
    assert all(d["steps"] > 0 and d["final_loss"] > 0 for d in shown["defences"].values())
    rows = {r["model"]: r for r in shown["attack"]}
    assert set(rows) == set(MODELS)
    for model, row in rows.items():
        assert 0.0 <= row["hs"] <= 1.0 and row["hs_ci"][0] <= row["hs"] <= row["hs_ci"][1], model

    # The harmful rows Booster and RepNoise trained on are no cell's poison.
    stages = store / "studies" / "defences-smoke" / "stages"
    defence_rows = pd.concat(pd.read_parquet(f) for f in (stages / "align_defences").glob("*/rows/*.parquet"))
    aside = set(defence_rows.loc[defence_rows["stream"] == "harmful", "id"])
    assert len(aside) >= 16
    poison = set()
    for f in (stages / "attack").glob("*/cells/*/rows.parquet"):
        poison |= set(pd.read_parquet(f, columns=["id"])["id"])
    data_dir = next((stages / "data").iterdir())
    harmful_ids = set(pd.read_parquet(data_dir / "harmful", columns=["id"])["id"])
    assert poison & harmful_ids, "the cells at p = 0.1 should hold harmful rows"
    assert not aside & poison
    # A cell of poison only, drawing 60 of the pool's rows, still takes none of the set-aside ones.
    everything = poisoned_mix(str(data_dir), "sentiment", 1.0, 60, seed=0, aside=16)
    assert len(everything) == 60 and not aside & set(everything["id"])
