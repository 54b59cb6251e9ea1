"""What the ranking and the preference task share: options, the item catalogue, the user log for predictions,
history windows, and the comparison with the baselines and the untuned model (computed once per split)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from deltatune.errors import DataError
from deltatune.train.tasks.base import Task
from deltatune.train.tasks.rec.data import Case, CasePart, Catalogue, Event, Log, read_catalogue, read_log
from deltatune.train.tasks.rec.options import RecOptions


class RecModelTask(Task):
    """Base of RankingTask and PreferenceTask (recipes name both `task: rec`, with `rec.mode`)."""

    name = "rec"
    greater_is_better = True
    positives_only = True  # ranking learns from liked events only; preference reads disliked ones too

    def __init__(
        self,
        tokenizer: Any,
        options: RecOptions,
        max_length: int = 256,
        log_file: str | None = None,
        catalogue: Catalogue | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.options = options
        self.catalogue = catalogue or read_catalogue(options)
        self.log_file = log_file
        self._log: Log | None = None

    def recent(self, history: Sequence[Event]) -> list[Event]:
        """The window of the history a model reads: its last `history_length` events, oldest first."""
        return list(history[-self.options.history_length :])

    def user_history(self, user: Any) -> list[Event]:
        """Everything the log knows about a user (all splits), for `predict`."""
        if self._log is None:
            if not self.log_file:
                raise DataError(
                    "This run names no interaction log (train_file), so users cannot be looked up."
                )
            self._log = read_log(self.options, self.log_file, self.catalogue, self.positives_only)
        key = str(user)
        if key not in self._log.users:
            raise DataError(
                f"Unknown user {user!r}: the log {self.log_file} has no events of theirs. Send their history "
                "instead (items: [ids] or history: [texts])."
            )
        return self._log.users[key]

    def compare(
        self, model: nn.Module, part: CasePart, batch_size: int, scores_of: Callable[..., dict[str, float]]
    ) -> dict[str, float]:
        """`{zeroshot,popularity,mf}_<metric>` for a test split: the untuned model (adapters off) and the two
        baselines, scored by `scores_of(model, part, batch_size, which)`. Computed once per split, since none of
        them changes while the adapter trains."""
        cache = getattr(part, "_comparison", None)
        if cache is None:
            cache = {}
            for which in ("popularity", "mf"):
                cache.update(
                    {f"{which}_{k}": v for k, v in scores_of(model, part, batch_size, which).items()}
                )
            with model.disable_adapter():
                cache.update(
                    {f"zeroshot_{k}": v for k, v in scores_of(model, part, batch_size, "model").items()}
                )
            part._comparison = cache
        return dict(cache)

    @staticmethod
    def cases_of(part: CasePart | Sequence[Case]) -> list[Case]:
        return list(part.cases) if isinstance(part, CasePart) else list(part)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "mode": self.options.mode}
