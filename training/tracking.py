"""Optional experiment tracking with Weights & Biases: never required, imported only when asked."""
from __future__ import annotations


class WandbTracker:
    """Logs per-member training curves and the final member table to one wandb run."""

    def __init__(self, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError as err:
            raise ValueError("--wandb_project needs the wandb package: pip install wandb") from err
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_members(self, rows: list[dict]) -> None:
        """The evaluated members as a table, and each member's metrics in the run summary."""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.run.log({"members": self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
        for r in rows:
            for key, value in r.items():
                if isinstance(value, (int, float)):
                    self.run.summary[f"{r['name']}/{key}"] = value

    def finish(self) -> None:
        self.run.finish()
