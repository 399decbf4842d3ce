"""Command line: ``python -m abcore verify K`` and ``python -m abcore weights NODES... --target T``.

verify K prints, for k = 1..K, the exact Adams-Bashforth weights, the check of
Proposition 2 (Eq. 3.6) and the measured convergence orders on the synthetic
nonlinear ODE of `abcore._convergence` (equal grid): the order-k prediction of the
right-hand side (the cache's predictor, every k up to 12) and the k-step
Adams-Bashforth integrator built from `multistep_weights` (k up to 6: beyond that its
stable step sizes leave errors below float64 resolution). Exit status 1 if any check
fails (a measured order more than 0.35 from k counts as a failure).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from abcore._convergence import auto_steps, fit_slope, make_grid
from abcore._weights import adams_bashforth_weights, extrapolation_weights, multistep_weights, verify_proposition_2

MAX_K = 30  # sympy stays fast; Proposition 2 itself holds for every k
MAX_PREDICTION_ORDER = 12  # float64 resolves the order-k prediction error up to here
MAX_INTEGRATOR_ORDER = 6
TOLERANCE = 0.35
ODE, GRID = "nonlinear", "equal"


def _order_arg(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer between 1 and {MAX_K}, got {text!r}") from None
    if not 1 <= k <= MAX_K:
        raise argparse.ArgumentTypeError(f"K must be an integer between 1 and {MAX_K}, got {k}")
    return k


def _measured_order(kind: str, k: int) -> float:
    ratio, max_steps = (2.0**0.5, 1024) if kind == "prediction" else (2.0, 1024)
    steps, errors = auto_steps(kind, k, GRID, ODE, ratio=ratio, max_steps=max_steps)
    if len(steps) < 3:
        return float("nan")
    h = [float(np.max(np.abs(np.diff(make_grid(GRID, n))))) for n in steps]
    return fit_slope(h[-3:], errors[-3:])


def _format_order(kind: str, label: str, k: int, limit: int) -> tuple[str, bool]:
    if k > limit:
        return f"{label} not measured (k > {limit})", True
    slope = _measured_order(kind, k)
    ok = abs(slope - k) <= TOLERANCE
    return f"{label} {slope:.2f}{'' if ok else ' FAILS'}", ok


def verify(max_k: int) -> bool:
    """Print the report for k = 1..max_k; True when every check passes."""
    print(f"abcore verify {max_k}: orders fitted as slopes of log(error) vs log(h), {ODE} ODE, {GRID} grid")
    all_ok = True
    for k in range(1, max_k + 1):
        weights = ", ".join(str(b) for b in adams_bashforth_weights(k))
        report = verify_proposition_2(k)
        prediction, ok_prediction = _format_order("prediction", "prediction", k, MAX_PREDICTION_ORDER)
        integrator, ok_integrator = _format_order("integrator", "AB integrator", k, MAX_INTEGRATOR_ORDER)
        all_ok &= bool(report) and ok_prediction and ok_integrator
        print(f"k={k}")
        print(f"  AB weights: {weights}")
        print(f"  Proposition 2: {report}")
        print(f"  measured order: {prediction}; {integrator}", flush=True)
    print("all checks pass" if all_ok else "SOME CHECKS FAIL")
    return all_ok


def weights(nodes: Sequence[float], target: float, integrate_to: float | None) -> None:
    """Print extrapolation weights at `target` (and multistep weights over [target, integrate_to])."""
    print("extrapolation weights:", " ".join(f"{w:.17g}" for w in extrapolation_weights(nodes, target)))
    if integrate_to is not None:
        w = multistep_weights(nodes, target, integrate_to)
        print("multistep weights:", " ".join(f"{v:.17g}" for v in w))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abcore", description="AB-Cache core: exact weights and checks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="exact AB weights, Proposition 2 and measured orders for k = 1..K")
    p_verify.add_argument("K", type=_order_arg, help=f"largest order, 1..{MAX_K}")
    p_weights = sub.add_parser("weights", help="Lagrange extrapolation weights at arbitrary nodes")
    p_weights.add_argument("nodes", type=float, nargs="+", help="distinct node times, newest first")
    p_weights.add_argument("--target", type=float, required=True, help="time to extrapolate to")
    p_weights.add_argument("--integrate-to", type=float, default=None, help="also print multistep weights")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return 0 if verify(args.K) else 1
    try:
        weights(args.nodes, args.target, args.integrate_to)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
