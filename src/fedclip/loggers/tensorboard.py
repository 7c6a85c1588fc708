"""TensorBoard: ``--log-to tensorboard[:DIR]`` (needs ``pip install 'fedclip[tensorboard]'``).

One event folder per held-out domain under ``DIR`` (so TensorBoard overlays them as runs):
mean accuracies (val, test = personalization, held-out = generalization), mean train loss,
seconds and bytes per round, and each client's val accuracy and train loss. A finished
held-out run adds its summary as text. ``tensorboard --logdir DIR`` shows them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedclip.callbacks import Callback
from fedclip.core.records import RoundRecord, RunResult, safe_name
from fedclip.errors import ConfigError

MEANS = {"accuracy/val": "mean_val_accuracy", "accuracy/personalization": "mean_test_accuracy",
         "accuracy/generalization": "heldout_accuracy", "loss/train": "mean_train_loss",
         "cost/round_seconds": "round_seconds", "cost/bytes": "bytes"}  # tag: attribute
PER_CLIENT = {"val_accuracy": "client_val_accuracy", "train_loss": "client_train_loss"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log-to tensorboard needs the tensorboard package: pip install "
                              "'fedclip[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self._writer_class = SummaryWriter
        self._writers: dict[str, Any] = {}

    def _writer(self, heldout: str) -> Any:
        if heldout not in self._writers:
            self._writers[heldout] = self._writer_class(str(self.log_dir / safe_name(heldout)))
        return self._writers[heldout]

    def on_round_end(self, heldout: str, record: RoundRecord) -> None:
        writer, step = self._writer(heldout), record.round
        for tag, key in MEANS.items():
            value = _number(getattr(record, key))
            if value is not None:
                writer.add_scalar(tag, value, step)
        for key, prefix in PER_CLIENT.items():
            for client, value in (getattr(record, key) or {}).items():
                value = _number(value)
                if value is not None:
                    writer.add_scalar(f"{prefix}/{client}", value, step)
        writer.flush()

    def on_run_end(self, heldout: str, result: RunResult) -> None:
        def pct(x: Any) -> str:
            return f"{100 * x:.2f} %" if _number(x) is not None else "n/a"

        text = (f"{result.algorithm} on {result.dataset}, held out {heldout}: "
                f"generalization {pct(result.generalization)}, personalization "
                f"{pct(result.personalization)} (round {result.best_round} of {result.rounds}; "
                f"zero-shot generalization {pct(result.zeroshot.generalization)})")
        writer = self._writer(heldout)
        writer.add_text("result", text, result.rounds)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
