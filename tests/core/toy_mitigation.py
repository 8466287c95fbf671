"""A toy mitigation, written the way a new method is added to memfree: this one file, plus one registry line
(``register_mitigation("toy", Toy)``, or a line in ``memfree.mitigate.METHODS``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memfree.mitigate import Mitigation, Request
from memfree.sampling import StepState


@dataclass
class Toy(Mitigation):
    """Scales the guidance of flagged-or-not images alike by ``strength`` and says it did, at every step."""

    name: ClassVar[str] = "toy"
    strength: float = 0.5

    def pieces(self, request: Request):
        def damp(s: StepState) -> None:
            s.eps = s.eps_u + self.strength * (s.eps - s.eps_u)
        return [damp]

    def finish(self, request: Request, out) -> None:
        for i in range(len(request.prompts)):
            request.applied[i] = True
            request.extra[i]["toy"] = {"strength": self.strength}
