"""Per-epoch metric records: a JSON-lines file and TensorBoard scalars, written by rank 0 only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resnext.io.atomic import write_text


class MetricsLog:
    """Appends one JSON object per epoch to metrics.jsonl and mirrors the numbers to TensorBoard."""

    def __init__(self, run_dir: Path, history: Sequence[dict[str, Any]] = (), enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        # On resume the file is rewritten from the checkpoint's history: records written after
        # the checkpoint (by a run that then died) belong to epochs that will be run again.
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in history))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=len(history) + 1
        )

    def write(self, record: dict[str, Any]) -> None:
        """Record one epoch's metrics."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            epoch = int(record["epoch"])
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and value == value:
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
