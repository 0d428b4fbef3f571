"""An ASE calculator backed by a catforge checkpoint: energies (eV) and forces (eV/A) for ASE.

:class:`CatforgeCalculator` wraps a :class:`~catforge.potential.Potential` (weights, normalisers
and model config of one checkpoint), so that ASE optimisers, MD integrators and NEB run on a
trained model. The checkpoint is read alone: no dataset is opened. Every calculation converts the
current ``Atoms`` (positions, cell, pbc, tags, FixAtoms) to a graph without edges, so the model's
graph step builds the neighbour list from the current positions each time::

    from ase.optimize import LBFGS
    from catforge.calculator import CatforgeCalculator

    atoms.calc = CatforgeCalculator(checkpoint="checkpoints/<ts>/checkpoint.pt")
    LBFGS(atoms).run(fmax=0.05)

Forces are the model's raw forces for every atom; ASE applies FixAtoms in ``atoms.get_forces()``.
A model without forces (an IS2RE energy model) gives energies only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from catforge.assemble.models import choose_device, load_potential
from catforge.data.atoms import atoms_to_graph
from catforge.potential.trained import Potential


class CatforgeCalculator(Calculator):
    """ASE calculator of a catforge model: ``energy``/``free_energy`` (eV), ``forces`` (eV/A).

    Give exactly one of ``checkpoint`` (a catforge checkpoint with its stored config) or an
    already-built ``potential``. ``device`` is where a checkpoint's model runs (default: CUDA when
    available, else the CPU); a given ``potential`` runs where it already is. Other keyword
    arguments go to :class:`ase.calculators.calculator.Calculator` (``label``, ``directory``, ...).
    Results are cached by ASE until positions, numbers, cell, pbc or tags change.
    """

    # ASE declares this as a list attribute of every calculator, so it cannot be a ClassVar.
    implemented_properties: list[str] = ["energy", "free_energy", "forces"]  # noqa: RUF012

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        potential: Potential | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.potential = _resolve_potential(checkpoint, potential, device)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's system changes, plus ``tags`` (a model input that ASE does not compare)."""
        changes: list[str] = super().check_state(atoms, tol=tol)
        if self.atoms is not None and not np.array_equal(self.atoms.get_tags(), atoms.get_tags()):
            changes.append("tags")
        return changes

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """Run the model on ``atoms`` and store energy, free energy and (if it has them) forces."""
        if "forces" in properties and not self.potential.regress_forces:
            owner = (
                "the potential's"
                if self.checkpoint is None
                else f"{self.checkpoint}: the checkpoint's"
            )
            raise PropertyNotImplementedError(
                f"{owner} model predicts energies only (regress_forces is off, as in IS2RE energy "
                "models); use a checkpoint of a forces (S2EF) model to get forces"
            )
        super().calculate(atoms, list(properties), list(system_changes))
        # A graph without edges: the model's graph step builds them from these positions.
        graph = atoms_to_graph(self.atoms, with_labels=False, float_dtype=self.potential.dtype)
        output = self.potential(graph)
        energy = float(output.energy.item())
        self.results = {"energy": energy, "free_energy": energy}
        if output.forces is not None:
            self.results["forces"] = output.forces.detach().cpu().double().numpy()


def _resolve_potential(
    checkpoint: str | Path | None,
    potential: Potential | None,
    device: str | torch.device | None,
) -> Potential:
    """The potential to run: loaded from ``checkpoint`` or the given one (exactly one of them)."""
    if checkpoint is not None and potential is not None:
        raise ValueError(
            "CatforgeCalculator got both checkpoint= and potential=; give exactly one of them"
        )
    if checkpoint is not None:
        run_on = choose_device(cpu=False) if device is None else torch.device(device)
        return load_potential(checkpoint, device=run_on)
    if potential is None:
        raise ValueError(
            "CatforgeCalculator needs a model: give checkpoint=PATH or potential=Potential"
        )
    if device is not None and torch.device(device) != potential.device:
        raise ValueError(
            f"the potential runs on {potential.device}, not {device}; build the Potential with "
            f"device={str(device)!r} or leave device out"
        )
    return potential
