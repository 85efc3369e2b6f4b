"""The frozen reference policy: log-probs only, no optimizer, no gradients."""

from __future__ import annotations

from actors.worker import ModelWorker


class ReferenceActor(ModelWorker):
    role = "reference"

    def __init__(self, model: str, **kwargs):
        super().__init__(model, **kwargs)
        self.model.requires_grad_(False)
