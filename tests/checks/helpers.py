"""Shared constructions for the check tests: exact float64 references and finding look-ups."""

from __future__ import annotations

import torch

from influence_doctor.causes import TAGS as CAUSES
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.findings import SEVERITY_RANK, Finding


def checks_of(outcome: CheckOutcome) -> list[str]:
    return [finding.check for finding in outcome.findings]


def only(outcome: CheckOutcome, check: str) -> Finding:
    """The single finding with this check id (fails when there are none or several)."""
    matches = [finding for finding in outcome.findings if finding.check == check]
    assert len(matches) == 1, f"expected one {check!r} finding, got {checks_of(outcome)}"
    return matches[0]


def assert_valid(findings: list[Finding]) -> None:
    for finding in findings:
        assert isinstance(finding, Finding)
        assert finding.severity in SEVERITY_RANK
        assert finding.cause is None or finding.cause in CAUSES
        assert isinstance(finding.message, str) and finding.message.strip()
        assert "." in finding.check and finding.stage


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    """A random orthonormal d×d matrix in float64 (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator(seed)))
    return q


def spd(d: int, seed: int = 0) -> torch.Tensor:
    """A well-conditioned symmetric positive definite float64 matrix."""
    a = torch.randn(d, d, dtype=torch.float64, generator=generator(seed))
    c = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    return 0.5 * (c + c.T)  # a BLAS product is symmetric only up to rounding; this is exactly symmetric


def antisymmetric(d: int, seed: int = 1) -> torch.Tensor:
    a = torch.randn(d, d, dtype=torch.float64, generator=generator(seed))
    return a - a.T


def householder(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """H = I − 2vvᵀ with ‖v‖=1: an exactly symmetric orthonormal matrix built in O(d²); returns (H, v)."""
    v = torch.randn(d, dtype=torch.float64, generator=generator(seed))
    v = v / torch.linalg.vector_norm(v)
    return torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v), v
