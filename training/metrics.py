"""Metrics: one JSON object per line in ``run_dir/metrics.jsonl`` (and wandb when enabled), rank 0 only.

On resume the file is cut back to the resumed step, so a restarted run leaves one clean curve.
"""
import json
import os
import time


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, wandb_cfg=None, config: dict | None = None,
                 resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self._truncate(resume_step)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, entity=wandb_cfg.entity,
                                    mode=wandb_cfg.mode, dir=run_dir, config=config, resume="allow",
                                    id=_wandb_id(run_dir))

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run_dir, so a resumed job continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if not os.path.exists(path):
        import uuid

        with open(path, "w") as f:
            f.write(uuid.uuid4().hex[:12])
    with open(path) as f:
        return f.read().strip()
