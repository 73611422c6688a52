"""Fake triton_kernels.matmul_ogs_details.opt_flags: the process-wide constraints vLLM sets."""

_opt_flags_constraints: dict = {}


def update_opt_flags_constraints(constraints: dict):
    _opt_flags_constraints.update(constraints)


def reset_opt_flags_constraints():
    _opt_flags_constraints.clear()
