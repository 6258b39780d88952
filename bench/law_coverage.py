"""How well each law's fit recovers the parameters that generated its data: the synthetic studies of
tests/test_laws.py (2% multiplicative noise), 20 seeds each, bootstrap 95% intervals.

Per exponent: how many of the 20 intervals cover the true value (the tests require >= 17), the relative
error of the seed-0 fit and the worst seed's (the tests require seed 0 within 10%), and the mean
interval width relative to the truth.

    python bench/law_coverage.py [--resamples 200] [--trials 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import report

from bigvit.scaling.laws import fit_law
from tests.test_laws import STUDIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for law, (study, true, exponents) in STUDIES.items():
        start = time.perf_counter()
        docs = [fit_law(study(seed=s), law, bootstrap=args.resamples, seed=s) for s in range(args.trials)]
        seconds = (time.perf_counter() - start) / args.trials
        for name in exponents:
            errors = np.array([d["params"][name] / true[name] - 1 for d in docs])
            covered = sum(d["ci95"][name][0] <= true[name] <= d["ci95"][name][1] for d in docs)
            widths = [(d["ci95"][name][1] - d["ci95"][name][0]) / true[name] for d in docs]
            rows.append({
                "law": law,
                "exponent": name,
                "true": true[name],
                "covered": f"{covered}/{args.trials}",
                "seed-0 error": f"{errors[0]:+.1%}",
                "worst error": f"{np.abs(errors).max():.1%}",
                "mean CI width": f"{np.mean(widths):.1%}",
                "failed resamples": sum(d["bootstrap"]["failed"] for d in docs),
                "s per fit": round(seconds, 2),
            })  # fmt: skip
    report("law_coverage", f"law recovery: {args.trials} seeds × {args.resamples} bootstrap resamples, 2% noise", rows)


if __name__ == "__main__":
    main()
