"""Kill -9 at seeded random points (step, evaluation, checkpoint write): resume reaches the same bits."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import HERE, model_state, record, same_bits, tiny_config_dict

from resnext.errors import CheckpointError
from resnext.train import load_checkpoint

N_TRAIN, N_VAL, BATCH, EPOCHS = 64, 32, 16, 3
STEPS_PER_EPOCH = N_TRAIN // BATCH
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
PHASE_ORDER = {"step": 0, "eval": 1, "write": 2}
SEED = 20260523


def kill_points(seed: int) -> list[dict]:
    """12 distinct kill points in run order: 4 during steps, 3 during evaluation, 5 during writes."""
    rng = random.Random(seed)
    steps = rng.sample(range(1, TOTAL_STEPS + 1), 4)
    points = [{"phase": "step", "global_step": g, "item": rng.randint(1, BATCH)} for g in steps]
    points += [
        {"phase": "eval", "global_step": e * STEPS_PER_EPOCH, "item": rng.randint(1, N_VAL)}
        for e in range(1, EPOCHS + 1)
    ]
    writes = rng.sample(range(1, TOTAL_STEPS + 1), 5)
    points += [
        {"phase": "write", "global_step": g, "mode": rng.choice(("partial", "before_rename"))}
        for g in writes
    ]
    points.sort(key=lambda p: (p["global_step"], PHASE_ORDER[p["phase"]]))
    return points


def test_kill_points_are_seeded_and_spread() -> None:
    a, b = kill_points(SEED), kill_points(SEED)
    assert a == b
    assert kill_points(SEED + 1) != a
    assert len(a) >= 10 and {p["phase"] for p in a} == set(PHASE_ORDER)


def test_kill_minus_nine_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    points = kill_points(SEED)
    ref_cfg = tiny_config_dict(tmp_path / "ref")
    chain_cfg = tiny_config_dict(tmp_path / "chain")
    base = {"n_train": N_TRAIN, "n_val": N_VAL}
    runs = [{**base, "config": ref_cfg, "kill": None}]
    runs += [{**base, "config": chain_cfg, "kill": p} for p in points]
    runs += [{**base, "config": chain_cfg, "kill": None}]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": runs, "snapshots": str(tmp_path / "snap")}))
    proc = subprocess.run(
        [sys.executable, str(HERE / "rel_helpers.py"), str(plan)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(plan.with_suffix(".results.json").read_text())
    assert results[0]["exit"] == 0, proc.stdout[-3000:]
    assert results[-1]["exit"] == 0, proc.stdout[-3000:]

    survived = half_written = 0
    seen: set[str] = set()
    for i, (point, res) in enumerate(zip(points, results[1:-1], strict=True), start=1):
        assert res["signal"] == 9, f"kill point {point} did not kill the run: {res}"
        snap = tmp_path / "snap" / f"{i:02d}"
        newest = point["global_step"] - 1  # the last checkpoint written completely before the kill
        if newest == 0:
            assert "last.pt" not in res["files"]
        else:
            # Loadable, and neither older nor newer than the newest complete checkpoint.
            assert load_checkpoint(snap / "last.pt")["global_step"] == newest, point
        new_tmp = [n for n in res["files"] if ".tmp" in n and n not in seen]
        seen.update(res["files"])
        if point.get("mode") == "partial":
            # The half-written temporary file is refused by name, never loaded.
            assert len(new_tmp) == 1, res["files"]
            with pytest.raises(CheckpointError, match=re.escape(new_tmp[0])):
                load_checkpoint(snap / new_tmp[0])
            half_written += 1
        if "best.pt" in res["files"]:
            load_checkpoint(snap / "best.pt")
        survived += 1

    ref_last = tmp_path / "ref" / "checkpoints" / "last.pt"
    chain_last = tmp_path / "chain" / "checkpoints" / "last.pt"
    assert load_checkpoint(chain_last)["global_step"] == TOTAL_STEPS
    differing = same_bits(model_state(ref_last), model_state(chain_last))
    assert differing == [], f"weights differ after kill/resume chain: {differing[:5]}"
    leftovers = sorted(p.name for p in chain_last.parent.iterdir() if ".tmp" in p.name)
    record(
        "kill_points",
        survived,
        failures=0,
        phases={ph: sum(p["phase"] == ph for p in points) for ph in PHASE_ORDER},
        leftover_tmp_files=len(leftovers),
        half_written_refused=half_written,
        seconds=round(sum(r["seconds"] for r in results), 2),
    )
