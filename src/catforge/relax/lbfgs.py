"""Batched L-BFGS that takes, for every system, exactly the steps of ``ase.optimize.LBFGS``.

Each system keeps its own history of at most ``memory`` pairs (s, y, rho): s = r_k - r_(k-1) (A),
y = f_(k-1) - f_k (eV/A, the change of the gradient), rho = 1 / (y . s). The step is ASE's two-loop
recursion with H0 = 1/alpha, followed by ASE's ``determine_step``: per system, L = largest atomic
|p_i|; if L >= maxstep the step is scaled by maxstep / L; then it is multiplied by damping. Every
dot product and maximum is a segment reduction over the atoms of one system, so systems never see
each other, and systems can leave (converged) or join (refill) the batch between steps.

How this differs from OCP's batched ``LBFGS`` (``lbfgs_torch.py``):

- before fairchem#440 it ran one L-BFGS on the flattened batch, summing every dot product across
  systems, so each system's step depended on the rest of the batch;
- its ``determine_step`` scales by min(L, maxstep) / (L + 1e-7), which also shrinks short steps, and
  its rho = 1 / (y . s) turns a zero step into inf/NaN. We follow ASE's rule and give a pair with
  y . s == 0 (or non-finite) rho = 0, i.e. it is ignored, where ASE would divide by zero.

History lives in a ring buffer shared by all systems and written at every step: a system's first
step writes a zero pair (rho 0, a no-op in the recursion), and a newly added system's atoms are zero
in every slot, so at its k-th step a system sees exactly its last min(memory, k - 1) real pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_F64 = torch.float64


@dataclass(frozen=True)
class LBFGSSettings:
    """OCP's relax_opt values (catforge defaults): maxstep A, memory pairs, damping, alpha eV/A^2.

    Raises ValueError naming the field unless maxstep, damping, alpha > 0 and memory >= 1.
    """

    maxstep: float = 0.04
    memory: int = 50
    damping: float = 1.0
    alpha: float = 70.0

    def __post_init__(self) -> None:
        for name in ("maxstep", "damping", "alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LBFGSSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"LBFGSSettings.memory must be an integer >= 1, got {self.memory!r}")


class BatchedLBFGS:
    """L-BFGS over a changing batch of systems, each with its own history (no cross-talk)."""

    def __init__(self, settings: LBFGSSettings, *, device: torch.device | str = "cpu") -> None:
        self.settings = settings
        self.device = torch.device(device)
        m = settings.memory
        self._natoms = torch.zeros(0, dtype=torch.long, device=self.device)
        self._iterations = torch.zeros(0, dtype=torch.long, device=self.device)
        self._batch = torch.zeros(0, dtype=torch.long, device=self.device)  # (n_atoms,) system
        # Ring buffer: s (memory, n_atoms, 3) A, y (memory, n_atoms, 3) eV/A, rho (memory,
        # n_systems) A^2/eV; _head is the slot written by the latest step.
        self._s = torch.zeros(m, 0, 3, dtype=_F64, device=self.device)
        self._y = torch.zeros(m, 0, 3, dtype=_F64, device=self.device)
        self._rho = torch.zeros(m, 0, dtype=_F64, device=self.device)
        self._head = -1
        self._pos0 = torch.zeros(0, 3, dtype=_F64, device=self.device)  # last step's positions
        self._f0 = torch.zeros(0, 3, dtype=_F64, device=self.device)  # last step's forces

    @property
    def n_systems(self) -> int:
        """Number of systems in the batch."""
        return int(self._natoms.numel())

    @property
    def natoms(self) -> torch.Tensor:
        """(n_systems,) long: atoms per system, in batch order."""
        return self._natoms.clone()

    @property
    def iterations(self) -> torch.Tensor:
        """(n_systems,) long: steps taken by each system."""
        return self._iterations.clone()

    def add_systems(self, natoms: torch.Tensor) -> None:
        """Append systems (natoms (k,) long) at the end of the batch, with a fresh state."""
        if natoms.ndim != 1 or natoms.is_floating_point() or natoms.dtype == torch.bool:
            raise ValueError(
                f"natoms must be a 1-D integer tensor, got shape {tuple(natoms.shape)} "
                f"dtype {natoms.dtype}"
            )
        if bool((natoms < 1).any()):
            raise ValueError(f"every system needs at least one atom, got natoms {natoms.tolist()}")
        natoms = natoms.to(device=self.device, dtype=torch.long)
        k, n_new = int(natoms.numel()), int(natoms.sum())
        m = self.settings.memory
        self._natoms = torch.cat([self._natoms, natoms])
        self._iterations = torch.cat([self._iterations, natoms.new_zeros(k)])
        self._batch = self._batch_index()
        atom_pad = torch.zeros(m, n_new, 3, dtype=_F64, device=self.device)
        self._s = torch.cat([self._s, atom_pad], dim=1)
        self._y = torch.cat([self._y, atom_pad], dim=1)
        self._rho = torch.cat([self._rho, self._rho.new_zeros(m, k)], dim=1)
        self._pos0 = torch.cat([self._pos0, atom_pad[0]])
        self._f0 = torch.cat([self._f0, atom_pad[0]])

    def keep_systems(self, keep: torch.Tensor) -> None:
        """Keep only systems where keep (n_systems,) bool is True (state and order unchanged)."""
        if keep.dtype != torch.bool or tuple(keep.shape) != (self.n_systems,):
            raise ValueError(
                f"keep must be a bool tensor of shape ({self.n_systems},), got shape "
                f"{tuple(keep.shape)} dtype {keep.dtype}"
            )
        keep = keep.to(self.device)
        atom_keep = keep[self._batch]
        self._natoms = self._natoms[keep]
        self._iterations = self._iterations[keep]
        self._batch = self._batch_index()
        self._s = self._s[:, atom_keep]
        self._y = self._y[:, atom_keep]
        self._rho = self._rho[:, keep]
        self._pos0 = self._pos0[atom_keep]
        self._f0 = self._f0[atom_keep]

    def step(
        self, pos: torch.Tensor, forces: torch.Tensor, fixed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step of every system: returns new positions (n_atoms, 3) float64.

        pos (n_atoms, 3) A, forces (n_atoms, 3) eV/A at pos (any float dtype; computed in float64),
        atoms ordered system by system as natoms says; fixed (n_atoms,) bool atoms never move
        (their forces are treated as zero).
        """
        n = int(self._batch.numel())
        for name, t in (("pos", pos), ("forces", forces)):
            if tuple(t.shape) != (n, 3) or not t.is_floating_point():
                raise ValueError(
                    f"{name} must be a float tensor of shape ({n}, 3) (the batch holds {n} atoms "
                    f"in {self.n_systems} systems), got shape {tuple(t.shape)} dtype {t.dtype}"
                )
        pos = pos.to(device=self.device, dtype=_F64)
        if fixed is None:
            fixed = torch.zeros(n, dtype=torch.bool)
        elif fixed.dtype != torch.bool or tuple(fixed.shape) != (n,):
            raise ValueError(
                f"fixed must be a bool tensor of shape ({n},), got shape "
                f"{tuple(fixed.shape)} dtype {fixed.dtype}"
            )
        free = ~fixed.to(self.device)[:, None]  # (n_atoms, 1)
        forces = torch.where(free, forces.to(device=self.device, dtype=_F64), 0.0)
        cfg = self.settings
        batch = self._batch

        # Store the pair (s, y) from the previous step (a zero pair for a system's first step).
        started = (self._iterations > 0)[batch][:, None]
        s_new = torch.where(started, pos - self._pos0, 0.0)
        y_new = torch.where(started, self._f0 - forces, 0.0)
        ys = self._dot(y_new, s_new)
        self._head = (self._head + 1) % cfg.memory
        self._s[self._head] = s_new
        self._y[self._head] = y_new
        ok = (ys != 0) & torch.isfinite(ys)
        self._rho[self._head] = torch.where(ok, 1.0 / torch.where(ok, ys, 1.0), 0.0)

        # Two-loop recursion over the newest ``loopmax`` slots, like ASE's LBFGSMethod.compute_step.
        loopmax = min(cfg.memory, int(self._iterations.max())) if n else 0
        slots = [(self._head - j) % cfg.memory for j in range(loopmax)]  # newest first
        q = -forces
        a: list[torch.Tensor] = []  # (n_systems,) per slot, newest first
        for i in slots:
            a.append(self._rho[i] * self._dot(self._s[i], q))
            q = q - a[-1][batch, None] * self._y[i]
        z = (1.0 / cfg.alpha) * q
        for i, a_i in zip(reversed(slots), reversed(a), strict=True):
            b = self._rho[i] * self._dot(self._y[i], z)
            z = z + self._s[i] * (a_i - b)[batch, None]
        p = -z

        # ASE's determine_step, per system, then damping.
        longest = torch.zeros(self.n_systems, dtype=_F64, device=self.device)
        longest = longest.scatter_reduce(0, batch, p.norm(dim=1), reduce="amax")
        scale = torch.where(longest >= cfg.maxstep, cfg.maxstep / longest, 1.0)
        dr = torch.where(free, p * scale[batch, None] * cfg.damping, 0.0)

        self._pos0 = pos.clone()  # the caller may edit its tensor in place
        self._f0 = forces
        self._iterations = self._iterations + 1
        return pos + dr

    def _batch_index(self) -> torch.Tensor:
        """(n_atoms,) long: the system of each atom, from natoms."""
        return torch.repeat_interleave(
            torch.arange(self.n_systems, device=self.device), self._natoms
        )

    def _dot(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-system dot product of two (n_atoms, 3) tensors -> (n_systems,)."""
        out = torch.zeros(self.n_systems, dtype=_F64, device=self.device)
        return out.index_add_(0, self._batch, (u * v).sum(dim=1))
