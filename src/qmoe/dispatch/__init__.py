"""backend="auto" and the plan of a MoE: which prepared layout runs at which token count, and why.

    plan = make_plan(spec, weights, "auto")     # prepares up to two layouts
    backend, run = plan.runner(M)               # resolved once per M, then cached
    plan.explain(M)                             # "M=16: triton (measured at M=16 on ...)"

The M-bucket rule and the tuning table it reads live in qmoe.tuning (the triton backend reads
its launch-config table through the same rule and store).
"""

from .plan import (DEFAULT_LAYOUT_BUDGET, SECOND_LAYOUT_MIN_GAIN, STATIC_ORDER, Choice, Plan, choose_layouts,
                   make_plan, probe, run_poisoning)

__all__ = ["Choice", "DEFAULT_LAYOUT_BUDGET", "Plan", "SECOND_LAYOUT_MIN_GAIN", "STATIC_ORDER", "choose_layouts",
           "make_plan", "probe", "run_poisoning"]
