"""bf16: unquantized weights (reference / comparison); data is the bf16 tensor itself."""

NAME = "bf16"
BLOCK = 1
SCALE_DTYPE = None
